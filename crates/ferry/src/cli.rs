//! Command-line definitions.
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry: a KVM hypervisor built for moving running VMs between hosts"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run one VM in the foreground until it powers off. With --api-socket and neither
    /// --guest nor --kernel: an empty VMM that waits for a VM (`ferry vm restore`).
    ///
    /// Exit status: 0 the guest powered off with code 0 (or the VM was shut down through the
    /// API); 1 Ferry failed (bad input, KVM error); 2 bad command line; 3 the guest powered
    /// off with a non-zero code; 4 the guest reset; 5 the guest crashed (triple fault, KVM
    /// emulation failure).
    Run(RunArgs),
    /// Control a running VM through its API socket.
    Vm(VmArgs),
    /// Ferry's main job in one command: two local "hosts" (ferry processes), the test guest
    /// rewriting memory with a heartbeat and writing its disk, live-migrated A→B (shared
    /// storage) and back B→A with its disk (shared-nothing), each move's report and the
    /// downtime the guest itself saw (largest heartbeat gap); then a two-host cluster (over
    /// etcd) moving a VM live with its ownership and restarting it when its host is killed.
    Demo(DemoArgs),
    /// Save a VM (state and memory) to a directory through its API socket.
    Snapshot(SnapshotArgs),
    /// Seeds for seeded migration (docs/seeding.md).
    Seed(SeedArgs),
    /// Run a VM from a snapshot directory (follows the chain of --diff snapshots).
    ///
    /// Exit status as for `ferry run`.
    Restore(RestoreArgs),
    /// Move a running VM to another host. `--to HOST:PORT`: live migration to a `ferry
    /// receive` there (pre-copy; with --postcopy / --postcopy-after / --auto-postcopy,
    /// post-copy). `--quick --via DIR`: pause, save to storage both hosts see, stop; then
    /// `ferry restore --from DIR` on the other host continues it. `--resume-postcopy`:
    /// reconnect a post-copy whose link broke.
    Migrate(MigrateArgs),
    /// Storage live migration: move a running VM's disk to another file, directory or
    /// format while the guest keeps writing it (`ferry disk move`), then pivot to it.
    Disk(DiskArgs),
    /// Wait for one incoming live migration, then run the VM like `ferry run`.
    ///
    /// Exit status as for `ferry run`; 1 when the migration fails before the VM runs here
    /// (nothing was started). In post-copy the VM runs (and its API answers) from the
    /// switch-over on, while its remaining pages arrive.
    Receive(ReceiveArgs),
    /// Make a CA and host certificates for TLS migrations (a quick start; any X.509 CA
    /// works): `ferry certs init --dir D`, then `ferry certs issue NAME --dir D` per host, and
    /// copy D/ca.pem, D/NAME.pem and D/NAME.key to that host.
    Certs(CertsArgs),
    /// A cluster host agent: joins the cluster (etcd, or the embedded store for one host),
    /// runs one fenced VMM per VM this host owns, restarts a failed host's VMs when it
    /// leads, and serves the cluster API and /metrics (docs/cluster.md).
    Host(crate::cluster::args::HostArgs),
    /// Talk to a cluster through any host agent: hosts, vms, create, start, stop, delete.
    Cluster(crate::cluster::args::ClusterArgs),
    /// Write Ferry's test guest image (a multiboot ELF) to a file, e.g. to boot it in QEMU:
    /// qemu-system-x86_64 -enable-kvm -kernel FILE -append 'heartbeat count=10'
    ///   -device isa-debug-exit,iobase=0xf4,iosize=4 -serial stdio -display none
    GuestImage {
        /// Where to write the image.
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Number of vCPUs (1..=32), one host thread each.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=32))]
    pub cpus: u8,
    /// Guest RAM, e.g. 512M, 4G (16M..=512G). Reserved sparse: host memory grows only with
    /// what the guest touches.
    #[arg(long, default_value = "512M")]
    pub memory: String,
    /// Boot Ferry's test guest with this workload, e.g. 'heartbeat period=1000 count=10'
    /// (docs/test-guest.md).
    #[arg(long, conflicts_with = "kernel")]
    pub guest: Option<String>,
    /// Kernel to boot: Linux bzImage or ELF vmlinux (64-bit boot protocol), or a multiboot ELF.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for a Linux kernel.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel; default "console=ttyS0").
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Write the serial console here instead of stdout.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Serve the control API (HTTP/JSON) on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// A virtio-blk disk: path=FILE[,format=raw|qcow2|vhdx][,readonly=on][,id=NAME]
    /// (repeatable; default format raw; the image is locked while the VM runs).
    #[arg(long = "disk", value_name = "SPEC")]
    pub disks: Vec<String>,
    /// A virtio-net NIC on an existing tap: tap=NAME[,mac=52:54:00:12:34:56] (repeatable;
    /// create the tap first: ip tuntap add dev NAME mode tap).
    #[arg(long = "net", value_name = "SPEC")]
    pub nets: Vec<String>,
    /// For cluster agents: this VMM owns its disks with this ownership epoch. Each writable
    /// disk's FILE.epoch must not hold a higher one (it is raised to this); every write is
    /// refused, and the vCPUs stop, past --fence-deadline-ns (moved on by PUT /vm/fence).
    #[arg(long)]
    pub fence_epoch: Option<i64>,
    /// With --fence-epoch: the deadline, in nanoseconds of the host's CLOCK_MONOTONIC.
    #[arg(long, requires = "fence_epoch")]
    pub fence_deadline_ns: Option<u64>,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Then {
    /// Let the VM run on (the default).
    Resume,
    /// Leave it paused.
    Pause,
    /// Stop it once the snapshot is durable and verified.
    Stop,
}

#[derive(Args, Debug)]
pub struct SnapshotArgs {
    /// API socket of the VM.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Directory to write (created if missing; a snapshot already there is replaced).
    #[arg(long)]
    pub to: PathBuf,
    /// Store only pages changed since this VM's previous snapshot (taken or restored from).
    #[arg(long)]
    pub diff: bool,
    /// What the VM does afterwards.
    #[arg(long, value_enum, default_value_t = Then::Resume)]
    pub then: Then,
}

#[derive(Args, Debug)]
pub struct SeedArgs {
    #[command(subcommand)]
    pub action: SeedAction,
}

#[derive(Subcommand, Debug)]
pub enum SeedAction {
    /// Write a seed of a running VM to DIR while it keeps running: its memory is copied in
    /// rounds as the guest runs (DIR/base, DIR/r1, ...), then the guest pauses only for what
    /// it wrote during the last round and its state (DIR). DIR is a point-in-time snapshot
    /// of that pause: ship it to the destination for `ferry receive --seed DIR`, or `ferry
    /// restore --from DIR`. Memory only for now: the VM's disks are not in the seed.
    Create {
        /// API socket of the VM.
        #[arg(long)]
        api_socket: PathBuf,
        /// Directory to write (created if missing).
        #[arg(long)]
        to: PathBuf,
    },
    /// Write what the running VM changed since its last seed (or snapshot) to DIR, the same
    /// way (the guest pauses only for the last round): a diff whose parent is that seed, named
    /// relative to it. Ship DIR beside the seed (both in one directory) and give the
    /// destination `ferry receive --seed DIR`; update again as often as wanted. Needs a seed
    /// taken (or restored) by this VMM.
    Update {
        /// API socket of the VM.
        #[arg(long)]
        api_socket: PathBuf,
        /// Directory to write: beside the seed it updates, or inside it.
        #[arg(long)]
        to: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot directory.
    #[arg(long)]
    pub from: PathBuf,
    /// Write the serial console here instead of stdout.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Start before checking the memory files' CRCs: each memory run is checked when the guest
    /// first touches it, before it can read it, and the rest in the background; a corrupt run
    /// stops the VM. Snapshots and migrations wait until all memory is in. Default: check
    /// everything before starting.
    #[arg(long)]
    pub lazy_check: bool,
    /// For cluster agents, as `ferry run --fence-epoch`: the VM's disks are owned with this
    /// epoch and the VMM fences itself past --fence-deadline-ns.
    #[arg(long)]
    pub fence_epoch: Option<i64>,
    #[arg(long, requires = "fence_epoch")]
    pub fence_deadline_ns: Option<u64>,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// API socket of the VM to move.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Live migration to the `ferry receive --listen` at HOST:PORT. With --resume-postcopy:
    /// where to reconnect (default: where the migration went).
    #[arg(long, conflicts_with_all = ["quick", "via"], required_unless_present_any = ["quick", "resume_postcopy"])]
    pub to: Option<String>,
    /// Quick migration through shared storage instead (needs --via).
    #[arg(long, requires = "via")]
    pub quick: bool,
    /// With --quick: directory on storage the destination host can read.
    #[arg(long, requires = "quick")]
    pub via: Option<PathBuf>,
    /// Ceiling on the pause, milliseconds: switch over once the predicted downtime is under
    /// it and further passes no longer halve the dirty memory (or it is under 1 ms).
    #[arg(long, default_value_t = 30)]
    pub downtime_limit: u64,
    /// Switch over after this many passes whatever the prediction (0: no limit).
    #[arg(long, default_value_t = 30)]
    pub max_passes: u32,
    /// Page compression on the wire (zero pages are never sent as data).
    #[arg(long, value_enum, default_value_t = Compress::None)]
    pub compress: Compress,
    /// Bandwidth cap in bytes per second over all connections, e.g. 100M (default: none).
    #[arg(long)]
    pub max_bandwidth: Option<String>,
    /// Parallel TCP data connections (1..=64), plus one control connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: u32,
    /// Throttle the vCPUs in growing steps (20 %, +10 % per pass, up to 99 %) while the guest
    /// dirties memory faster than the link carries it.
    #[arg(long)]
    pub auto_converge: bool,
    /// Give up (or switch over, see --on-timeout) after this many seconds.
    #[arg(long)]
    pub timeout: Option<f64>,
    /// What --timeout does: cancel (the VM keeps running here) or switch over at once.
    #[arg(long, value_enum, default_value_t = OnTimeout::Cancel, requires = "timeout")]
    pub on_timeout: OnTimeout,
    /// Post-copy: switch over right after the first pass (unless that pass already converged);
    /// the VM then runs on the destination and fetches the pages it lacks from here (on
    /// demand, the rest pushed in the background). Same as --postcopy-after 1.
    #[arg(long, conflicts_with = "postcopy_after")]
    pub postcopy: bool,
    /// Hybrid: post-copy after this many pre-copy passes (0: at once, before any page), unless
    /// pre-copy converges first.
    #[arg(long, value_name = "PASSES")]
    pub postcopy_after: Option<u32>,
    /// Switch to post-copy when pre-copy does not converge (the guest re-dirties more than
    /// half of what a pass sent), or at --max-passes / a --timeout that switches over.
    #[arg(long)]
    pub auto_postcopy: bool,
    /// Reconnect a post-copy whose link broke now (it retries every second by itself), to
    /// --to if given. The VM runs on the destination meanwhile; vCPUs that touch a page still
    /// here wait.
    #[arg(long, conflicts_with_all = ["quick", "postcopy", "postcopy_after", "auto_postcopy"])]
    pub resume_postcopy: bool,
    /// CPU priority of the threads that copy pages here while the guest runs: normal (the
    /// vCPUs' own) or low (they yield to the vCPUs, so the guest does not stall where they
    /// share cores; but on a host whose cores are all busy with guests the copy gets little
    /// CPU and the migration can take very long).
    #[arg(long, value_enum, default_value_t = Priority::Normal)]
    pub copy_priority: Priority,
    /// Shared-nothing migration: the disks come too. The destination creates each disk new
    /// (in its --storage-dir, or where --disk-map says) and the allocated data is copied
    /// first, while writes to what was copied go to both hosts; then memory moves as usual.
    /// A failure before commit leaves the VM here on its own disks and the destination
    /// deletes what it made.
    #[arg(long, conflicts_with_all = ["quick", "resume_postcopy"])]
    pub copy_storage: bool,
    /// Seeded migration: the destination (`ferry receive --seed DIR`) holds a copy of this
    /// VM from earlier (a snapshot of it); it sends the content hashes of the pages it holds
    /// and the first pass sends only the pages that differ, then the migration goes on as
    /// any other. Refused when the destination holds no seed, or one of another VM.
    #[arg(long, conflicts_with_all = ["quick", "resume_postcopy"])]
    pub seeded: bool,
    /// With --copy-storage: where the destination puts disk ID (a relative path is inside its
    /// --storage-dir), and in which format: ID=PATH[,format=raw|qcow2|vhdx] (repeatable).
    #[arg(
        long = "disk-map",
        value_name = "ID=PATH[,format=F]",
        requires = "copy_storage"
    )]
    pub disk_map: Vec<String>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
}

/// How migration connections are secured: TLS 1.3 with certificates on both sides, or
/// (explicitly) plain TCP.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// This host's certificate chain (PEM), e.g. from `ferry certs issue`.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Its private key (PEM; refused if group or others can read it).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA the peer's certificate must chain to (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// A name (DNS name or IP address) the peer's certificate must be valid for; repeat for
    /// several. Default: `ferry migrate` checks the host of --to; `ferry receive` accepts any
    /// certificate the CA signed.
    #[arg(long = "tls-peer", requires = "tls_cert", value_name = "NAME")]
    pub tls_peers: Vec<String>,
    /// Plain TCP: the peer is not authenticated and the VM's memory crosses the network in
    /// clear. Only for a network nobody else can reach.
    #[arg(long, conflicts_with = "tls_cert")]
    pub insecure: bool,
}

#[derive(Args, Debug)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub action: CertsAction,
}

#[derive(Subcommand, Debug)]
pub enum CertsAction {
    /// Create a CA (DIR/ca.pem, DIR/ca.key, key mode 0600).
    Init {
        /// Where the CA lives.
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue a certificate for host NAME (its DNS name or IP address, as peers will name it):
    /// DIR/NAME.pem and DIR/NAME.key, good for both ends of a migration.
    Issue {
        /// The host's name or address.
        name: String,
        /// The CA's directory (from `ferry certs init`).
        #[arg(long)]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    Low,
    Normal,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compress {
    None,
    Lz4,
    Zstd,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnTimeout {
    Cancel,
    SwitchOver,
}

#[derive(Args, Debug)]
pub struct ReceiveArgs {
    /// Address to listen on, e.g. 0.0.0.0:4444 or 127.0.0.1:4444.
    #[arg(long)]
    pub listen: String,
    /// Write the serial console here instead of stdout.
    #[arg(long)]
    pub console_log: Option<PathBuf>,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub api_socket: Option<PathBuf>,
    /// Where the disks of a shared-nothing migration (`ferry migrate --copy-storage`) are
    /// created, unless the source maps them elsewhere (an existing file is never replaced).
    #[arg(long)]
    pub storage_dir: Option<PathBuf>,
    /// A seed of the VM that will arrive: a snapshot directory of it (`ferry snapshot`; a
    /// diff's whole chain is read), e.g. shipped here ahead on removable media. Used when
    /// the source runs `ferry migrate --seeded`: its memory is loaded, and only the pages
    /// that differ cross the network. Checked before listening.
    #[arg(long, value_name = "DIR")]
    pub seed: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// For cluster agents: the VM arrives owned at this epoch (its source's) and is fenced
    /// as `ferry run --fence-epoch` fences; it runs only once --cluster-agent says this host
    /// now owns it, with the new epoch.
    #[arg(long, requires_all = ["cluster_agent", "cluster_vm", "cluster_host"])]
    pub fence_epoch: Option<i64>,
    /// The agent (HOST:PORT) that confirms the hand-over after Commit.
    #[arg(long, requires = "fence_epoch")]
    pub cluster_agent: Option<String>,
    /// The VM's name in the cluster.
    #[arg(long, requires = "fence_epoch")]
    pub cluster_vm: Option<String>,
    /// This host's id in the cluster.
    #[arg(long, requires = "fence_epoch")]
    pub cluster_host: Option<String>,
}

#[derive(Args, Debug)]
pub struct VmArgs {
    /// What to do.
    #[arg(value_enum)]
    pub action: VmAction,
    /// API socket of the VM (its `ferry run --api-socket`).
    #[arg(long)]
    pub api_socket: PathBuf,
    /// Snapshot directory (restore only).
    #[arg(long, required_if_eq("action", "restore"))]
    pub from: Option<PathBuf>,
    /// Start at once and check the memory files' CRCs as the guest first touches each run
    /// (before it can read it) and in the background; a corrupt run stops the VM (restore
    /// only).
    #[arg(long)]
    pub lazy_check: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum VmAction {
    /// Print the VM's configuration and state as JSON.
    Info,
    /// Stop every vCPU.
    Pause,
    /// Continue a paused VM.
    Resume,
    /// Stop the VM (its `ferry run` exits).
    Shutdown,
    /// Restore a snapshot (--from DIR) into an empty VMM and start it.
    Restore,
    /// Print the running (or last) live migration's progress as JSON.
    Migration,
    /// Cancel the running live migration (the VM keeps running here).
    CancelMigration,
}

#[derive(Args, Debug)]
pub struct DiskArgs {
    #[command(subcommand)]
    pub action: DiskAction,
}

#[derive(Subcommand, Debug)]
pub enum DiskAction {
    /// Copy the disk's allocated data to a new image while the guest runs; guest writes to
    /// what was copied go to both files, so it converges at any write rate; then the VM
    /// switches to the new file (its vCPUs never stop). Cancel (Ctrl-C does not cancel: use
    /// `ferry disk cancel`) or a failure leaves the VM on its old file and deletes the new
    /// one. The old file stays where it was.
    Move(DiskMoveArgs),
    /// Cancel the running disk move (the VM stays on its old file).
    Cancel {
        /// API socket of the VM.
        #[arg(long)]
        api_socket: PathBuf,
    },
    /// Print the running (or last) disk move's progress as JSON.
    Status {
        /// API socket of the VM.
        #[arg(long)]
        api_socket: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct DiskMoveArgs {
    /// API socket of the VM.
    #[arg(long)]
    pub api_socket: PathBuf,
    /// The disk's id (`--disk ...,id=NAME`; disk0, disk1, ... by default).
    #[arg(long)]
    pub disk: String,
    /// A new file, or an existing directory (the disk keeps its file name there, with the
    /// new format's extension if the format changes). An existing file is never overwritten.
    #[arg(long)]
    pub to: PathBuf,
    /// Format of the new image (default: the disk's own).
    #[arg(long, value_parser = ["raw", "qcow2", "vhdx"])]
    pub format: Option<String>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Memory the guest keeps rewriting while it moves.
    #[arg(long, default_value = "256M")]
    pub dirty: String,
    /// How fast it rewrites it (bytes per second).
    #[arg(long, default_value = "50M")]
    pub rate: String,
    /// Switch-over target, milliseconds.
    #[arg(long, default_value_t = 30)]
    pub downtime_limit: u64,
    /// Parallel data connections per migration.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub connections: u32,
    /// Move by post-copy after one pre-copy pass unless that pass already converged (the VM
    /// then runs on the destination while the pages dirtied since are fetched).
    #[arg(long)]
    pub postcopy: bool,
    /// Migrate over plain TCP instead of TLS with a CA made for the demo.
    #[arg(long)]
    pub insecure: bool,
    /// Skip the last act (a two-host cluster: a live move with its ownership, then a host
    /// killed and its VM restarted on the other; needs etcd).
    #[arg(long)]
    pub no_cluster: bool,
    /// Skip the overlay act (two sites on different subnets and a client, as network
    /// namespaces: a VM keeps its address and one open TCP connection across a live and a
    /// post-copy move between the sites; needs root and etcd).
    #[arg(long)]
    pub no_overlay: bool,
}
