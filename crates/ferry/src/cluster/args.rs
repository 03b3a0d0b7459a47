//! Command lines of `ferry host` and `ferry cluster`.
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct HostArgs {
    /// This host's name in the cluster (1-64 letters, digits, '-', '_', '.').
    #[arg(long)]
    pub id: String,
    /// Where the cluster API listens (HOST:PORT), for `ferry cluster --agent`.
    #[arg(long)]
    pub listen: String,
    /// The cluster store: etcd://HOST:PORT[,HOST:PORT...] (several hosts), or file:PATH (the
    /// embedded store, one host). Default: file:RUN_DIR/cluster.json.
    #[arg(long)]
    pub store: Option<String>,
    /// Shared storage every host sees: VM disks given by relative path live here.
    #[arg(long)]
    pub storage: PathBuf,
    /// Local directory for the VMMs' API sockets, consoles and logs (default
    /// /run/ferry/ID).
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Membership lease TTL in whole seconds: a host silent this long is taken as failed.
    /// It must outlast an etcd leader election (renewals cannot be acknowledged without a
    /// leader; 1.3-1.7 s with etcd's default 1 s election timeout), or hosts fence their
    /// VMs whenever etcd's leader dies.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub ttl: u64,
    /// Seconds after a host's lease is gone before its VMs restart elsewhere.
    #[arg(long, default_value_t = 2.0)]
    pub grace: f64,
    /// CPUs this host offers VMs (default: the host's).
    #[arg(long)]
    pub cpus: Option<u32>,
    /// Memory this host offers VMs, e.g. 16G (default: the host's).
    #[arg(long)]
    pub memory: Option<String>,
    /// This host's provider address (an IPv4 address of this host that the other hosts
    /// reach): it carries virtual networks, as a VXLAN endpoint from this address (docs/
    /// network.md). Without it, VMs with NICs on virtual networks cannot run here.
    #[arg(long, value_name = "IPV4")]
    pub provider_addr: Option<std::net::Ipv4Addr>,
    /// No automatic balancing when this agent leads.
    #[arg(long)]
    pub no_balance: bool,
    /// Balancing: a host is overloaded above this share of its CPUs.
    #[arg(long, default_value_t = 0.80)]
    pub balance_high: f64,
    /// Balancing: a move may only land where the target stays at or under this share.
    #[arg(long, default_value_t = 0.60)]
    pub balance_low: f64,
    /// Balancing: seconds a host must stay overloaded before a VM leaves it.
    #[arg(long, default_value_t = 30.0)]
    pub balance_sustain: f64,
    /// Balancing: seconds a VM that moved (or failed to) is left alone.
    #[arg(long, default_value_t = 300.0)]
    pub balance_backoff: f64,
    /// Mutual TLS 1.3 for the cluster API and for live migrations between hosts: this
    /// host's certificate (for the address of --listen, e.g. `ferry certs issue 10.0.0.5`),
    /// its key and the cluster's CA. The API then serves only clients with a certificate of
    /// that CA (other agents, `ferry cluster --tls-*`).
    #[command(flatten)]
    pub tls: Credentials,
    /// No TLS: the cluster API answers anyone who can reach --listen, and migrations run
    /// over plain TCP (not authenticated, not encrypted). Only for a network nobody else
    /// can reach.
    #[arg(
        long,
        conflicts_with = "tls_cert",
        required_unless_present = "tls_cert"
    )]
    pub insecure: bool,
}

/// A certificate, its key and the CA (`--tls-cert`, `--tls-key`, `--tls-ca`), all or none.
#[derive(Args, Debug)]
pub struct Credentials {
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
}

impl Credentials {
    /// (certificate, key, CA) made absolute (VMMs started elsewhere get them too), when
    /// given.
    pub fn paths(&self) -> Option<(PathBuf, PathBuf, PathBuf)> {
        let abs = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        Some((
            abs(self.tls_cert.as_ref()?),
            abs(self.tls_key.as_ref()?),
            abs(self.tls_ca.as_ref()?),
        ))
    }

    /// The same as TLS files that accept any certificate of the CA.
    pub fn files(&self) -> Option<ferry_migration::tls::TlsFiles> {
        let (cert, key, ca) = self.paths()?;
        Some(ferry_migration::tls::TlsFiles::any_peer(cert, key, ca))
    }
}

#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// Any host agent's cluster API (HOST:PORT).
    #[arg(long)]
    pub agent: String,
    /// For agents whose API is TLS (`ferry host --tls-cert`): a certificate of the cluster's
    /// CA (e.g. `ferry certs issue admin`), its key and the CA; the agent's certificate must
    /// be valid for the host of --agent.
    #[command(flatten)]
    pub tls: Credentials,
    #[command(subcommand)]
    pub action: ClusterAction,
}

#[derive(Subcommand, Debug)]
pub enum ClusterAction {
    /// The live hosts: capacity, VMs, load, which one leads.
    Hosts,
    /// Every VM: desired state, owner and epoch.
    Vms,
    /// Define a VM (started unless --stopped): the leader places it on the least loaded
    /// host that has the memory.
    Create(CreateArgs),
    /// Start a stopped VM.
    Start { name: String },
    /// Shut a VM down (it stays defined).
    Stop { name: String },
    /// Forget a stopped VM.
    Delete { name: String },
    /// Live-migrate a VM to HOST (default: the least loaded other host that fits); its
    /// ownership moves at the switch-over.
    Migrate {
        name: String,
        #[arg(long)]
        to: Option<String>,
        /// Bandwidth cap in bytes per second, e.g. 100M (default: none).
        #[arg(long, conflicts_with = "quick")]
        max_bandwidth: Option<String>,
        /// Quick migration instead: pause, save the VM to the shared storage, resume it on
        /// the target (the ownership moves once the save is durable and the source stopped).
        #[arg(long)]
        quick: bool,
        /// Post-copy: after one pre-copy pass the VM runs on the target at once and the
        /// pages it has not received yet follow on demand.
        #[arg(long, conflicts_with = "quick")]
        postcopy: bool,
    },
    /// Mark HOST so nothing is placed on it and live-migrate its VMs away, one at a time,
    /// highest priority first (`undrain` cancels before the next VM).
    Drain {
        host: String,
        /// A VM that cannot move live moves by quick migration through the shared storage.
        #[arg(long)]
        allow_quick: bool,
    },
    /// Let VMs be placed on HOST again (stops a drain in progress before its next VM).
    Undrain { host: String },
    /// Virtual networks: overlays whose VMs keep their addresses wherever they run.
    Net {
        #[command(subcommand)]
        action: NetAction,
    },
    /// What the leader's balancer decided last, and why, with each host's load.
    Balance {
        /// Only show the decision (the balancer itself runs in the leader, unless its agent
        /// was started with --no-balance).
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum NetAction {
    /// Define a virtual network: a VXLAN network id and the MTU inside it.
    Create {
        name: String,
        /// VXLAN network identifier, 1 to 16777215, one per network.
        #[arg(long)]
        vni: u32,
        /// The MTU inside the network: the provider network's less VXLAN's 50 bytes.
        #[arg(long, default_value_t = ferry_cluster::net::DEFAULT_MTU)]
        mtu: u32,
    },
    /// The networks, and where each NIC on them runs now (the CA→PA map).
    List,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    pub name: String,
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cpus: u8,
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// As for `ferry run --disk`; a relative path is on the hosts' shared storage.
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// Ferry's test guest with this workload.
    #[arg(long, conflicts_with = "kernel", required_unless_present = "kernel")]
    pub guest: Option<String>,
    /// A kernel every host can read (a relative path is on the shared storage).
    #[arg(long)]
    pub kernel: Option<String>,
    #[arg(long, requires = "kernel")]
    pub cmdline: Option<String>,
    /// A NIC on a virtual network, `network=NAME,ca=A.B.C.D[,mac=MAC]` (repeatable): its
    /// customer address stays the same on every host the VM runs on. MAC default:
    /// 52:54:00 and three bytes from the VM's name and the NIC's index.
    #[arg(long = "nic", value_name = "SPEC")]
    pub nics: Vec<String>,
    /// Higher restarts first after a host failure.
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Define it without starting it.
    #[arg(long)]
    pub stopped: bool,
}
