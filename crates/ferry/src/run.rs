//! `ferry run`: build a VM from the command line, serve its API, run it to the end.
use crate::api::host::Host;
use crate::cli::{ReceiveArgs, RestoreArgs, RunArgs};
use anyhow::{Context, Result};
use ferry_migration::engine::{Acceptor, Limits};
use ferry_migration::tls::{TlsFiles, TlsServer};
use ferry_vmm::devices::{DiskConfig, NetConfig};
use ferry_vmm::live::LiveDestination;
use ferry_vmm::snapshot::MemoryCheck;
use ferry_vmm::{BootSource, GuestExit, Vm, VmConfig};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub const EXIT_ERROR: i32 = 1;
pub const EXIT_GUEST_ERROR: i32 = 3;
pub const EXIT_RESET: i32 = 4;
pub const EXIT_CRASH: i32 = 5;

pub fn config_from(args: &RunArgs) -> Result<VmConfig> {
    let memory = ferry_vmm::parse_size(&args.memory).context("--memory")?;
    let boot = match (&args.guest, &args.kernel) {
        (Some(g), _) => BootSource::TestGuest { args: g.clone() },
        (None, Some(k)) => BootSource::Kernel {
            path: k.clone(),
            initrd: args.initrd.clone(),
            cmdline: args
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0".into()),
        },
        (None, None) => anyhow::bail!("one of --guest or --kernel is required"),
    };
    let mut disks = Vec::new();
    for (i, d) in args.disks.iter().enumerate() {
        let d = DiskConfig::parse(d, i).map_err(|e| anyhow::anyhow!("--disk {d}: {e}"))?;
        if disks.iter().any(|o: &DiskConfig| o.id == d.id) {
            anyhow::bail!("--disk: two disks have the id {:?}", d.id);
        }
        disks.push(d);
    }
    let mut nets = Vec::new();
    for (i, n) in args.nets.iter().enumerate() {
        let n = NetConfig::parse(n, i).map_err(|e| anyhow::anyhow!("--net {n}: {e}"))?;
        if nets.iter().any(|o: &NetConfig| o.tap == n.tap) {
            anyhow::bail!("--net: two NICs on the tap {:?}", n.tap);
        }
        nets.push(n);
    }
    Ok(VmConfig {
        cpus: args.cpus,
        memory,
        boot,
        disks,
        nets,
    })
}

pub fn console(log: &Option<std::path::PathBuf>) -> Result<Box<dyn std::io::Write + Send>> {
    Ok(match log {
        Some(p) => Box::new(
            std::fs::File::create(p).with_context(|| format!("--console-log {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    })
}

pub fn main(args: RunArgs) -> Result<i32> {
    // Claim the API socket before building the VM so a busy path fails fast.
    let listener = bind(&args.api_socket)?;
    if args.guest.is_none() && args.kernel.is_none() {
        // An empty VMM: it serves the API until a VM arrives (PUT /vm/restore).
        let listener = listener.context("an empty VMM needs --api-socket")?;
        let host = Host::new(None, args.console_log.clone());
        let server = crate::api::server::spawn(listener, host.clone())?;
        let vm = host.wait_for_vm();
        return Ok(finish(&vm, server));
    }
    let config = config_from(&args)?;
    let fence = install_fence(args.fence_epoch, args.fence_deadline_ns);
    let vm = Arc::new(Vm::new(config, console(&args.console_log)?)?);
    if let Some(f) = fence {
        crate::api::watch_fence(vm.clone(), f);
    }
    serve_and_wait(vm, listener, &args.console_log, Start::Boot, None)
}

/// How [`serve_and_wait`] starts the VM.
#[derive(PartialEq)]
enum Start {
    /// Already running (it arrived by live migration).
    No,
    Boot,
    /// A restored VM, maybe on another host than the one it was saved on.
    Resume,
}

/// Installs this process's fence (`--fence-epoch`, `--fence-deadline-ns`), before any disk
/// is opened.
fn install_fence(
    epoch: Option<i64>,
    deadline_ns: Option<u64>,
) -> Option<Arc<ferry_storage::fence::Fence>> {
    epoch.map(|e| {
        let f = ferry_storage::fence::Fence::new(e, deadline_ns);
        // The first install in this process: nothing else installs one.
        let _ = ferry_storage::fence::install(f.clone());
        f
    })
}

fn bind(p: &Option<std::path::PathBuf>) -> Result<Option<crate::api::server::Bound>> {
    p.as_deref().map(crate::api::server::bind).transpose()
}

/// Serves the API (if any), runs the VM to its end, reports how it ended.
fn serve_and_wait(
    vm: Arc<Vm>,
    listener: Option<crate::api::server::Bound>,
    console_log: &Option<std::path::PathBuf>,
    start: Start,
    arriving: Option<Arc<AtomicBool>>,
) -> Result<i32> {
    let host = Host::arriving(
        Some(vm.clone()),
        console_log.clone(),
        arriving.unwrap_or_default(),
    );
    let server = listener
        .map(|l| crate::api::server::spawn(l, host))
        .transpose()?;
    if start != Start::No {
        vm.start()?;
    }
    if start != Start::No {
        // A VM that appears on this host, booted or restored, has its NICs announce it
        // (`Vm::announce_after_move`): bridges and switches still pointing elsewhere learn
        // its port. A VM booted after a failover is one: the overlay bridge of its new host
        // learned its MAC on the VXLAN port while it ran on the old host, and a guest that
        // only answers would otherwise never be reached.
        vm.announce_after_move();
    }
    Ok(match server {
        Some(s) => finish(&vm, s),
        None => report(&vm.wait()),
    })
}

/// Waits for the VM to end, lets the API answer what is in flight, reports the end.
fn finish(vm: &Vm, server: crate::api::server::Server) -> i32 {
    let exit = vm.wait();
    server.stop();
    report(&exit)
}

/// `ferry restore`.
pub fn restore(args: RestoreArgs) -> Result<i32> {
    let listener = bind(&args.api_socket)?;
    let check = if args.lazy_check {
        MemoryCheck::Background
    } else {
        MemoryCheck::BeforeStart
    };
    let fence = install_fence(args.fence_epoch, args.fence_deadline_ns);
    let t0 = std::time::Instant::now();
    let (vm, rep) = ferry_vmm::snapshot::restore(&args.from, console(&args.console_log)?, check)
        .with_context(|| format!("restoring from {}", args.from.display()))?;
    eprintln!(
        "ferry: restored {} (chain of {}, {} MiB mapped, memory {}) ready in {:.1} ms",
        args.from.display(),
        rep.chain,
        rep.bytes_mapped >> 20,
        if rep.memory_verified_before_start {
            "verified"
        } else {
            "checked page run by page run as it is first touched, and in the background"
        },
        t0.elapsed().as_secs_f64() * 1e3
    );
    let vm = Arc::new(vm);
    if let Some(f) = fence {
        crate::api::watch_fence(vm.clone(), f);
    }
    serve_and_wait(vm, listener, &args.console_log, Start::Resume, None)
}

/// Migration sockets give up on a silent peer after this.
pub const MIGRATION_IO_TIMEOUT: std::time::Duration = ferry_migration::engine::IO_TIMEOUT;

/// The TLS files given on the command line, made absolute (the VMM process that opens them
/// may run elsewhere); None for `--insecure`; an error when neither was given.
pub fn tls_files(a: &crate::cli::TlsArgs) -> Result<Option<TlsFiles>> {
    let abs = |p: &std::path::Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    match (&a.tls_cert, &a.tls_key, &a.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
            cert: abs(cert),
            key: abs(key),
            ca: abs(ca),
            peers: a.tls_peers.clone(),
        })),
        _ if a.insecure => Ok(None),
        _ => anyhow::bail!(
            "migration connections need TLS (--tls-cert, --tls-key, --tls-ca; `ferry certs` \
             makes them) or an explicit --insecure for plain TCP"
        ),
    }
}

/// `ferry certs`.
pub fn certs(args: crate::cli::CertsArgs) -> Result<()> {
    use ferry_migration::certs;
    match args.action {
        crate::cli::CertsAction::Init { dir, days } => {
            let (c, k) = certs::init_ca(&dir, days)?;
            println!(
                "CA certificate: {}\nCA key:         {} (keep it off the hosts)",
                c.display(),
                k.display()
            );
        }
        crate::cli::CertsAction::Issue { name, dir, days } => {
            let (c, k) = certs::issue(&dir, &name, days)?;
            println!(
                "certificate for {name}: {}\nkey:                  {}\nuse: --tls-cert {} --tls-key {} --tls-ca {}",
                c.display(),
                k.display(),
                c.display(),
                k.display(),
                certs::ca_paths(&dir).0.display()
            );
        }
    }
    Ok(())
}

/// `ferry receive`.
pub fn receive(args: ReceiveArgs) -> Result<i32> {
    let tls = match tls_files(&args.tls)? {
        Some(f) => {
            if args.cluster_agent.is_some() {
                // The hand-over asks the agent, whose API takes the same credentials.
                crate::cluster::secure::use_tls(&TlsFiles {
                    peers: Vec::new(),
                    ..f.clone()
                })?;
            }
            Some(Arc::new(TlsServer::new(&f)?))
        }
        None => None,
    };
    let seed = match &args.seed {
        Some(dir) => {
            let s = ferry_vmm::seed::Seed::open(dir)
                .with_context(|| format!("--seed {}", dir.display()))?;
            eprintln!(
                "ferry: holding a seed of a VM with {} vCPUs and {} MiB from {}",
                s.config().cpus,
                s.config().memory >> 20,
                dir.display()
            );
            Some(s)
        }
        None => None,
    };
    let listener = bind(&args.api_socket)?;
    let l = std::net::TcpListener::bind(&args.listen)
        .with_context(|| format!("--listen {}", args.listen))?;
    let limits = Limits {
        io_timeout: MIGRATION_IO_TIMEOUT,
        ..Limits::default()
    };
    let acc = Acceptor::new(l, tls, limits)?;
    eprintln!(
        "ferry: waiting for a migration on {} ({})",
        acc.local_addr(),
        if acc.is_tls() {
            "TLS 1.3, peers must present a certificate of the CA"
        } else {
            "plain TCP, --insecure: not authenticated, not encrypted"
        }
    );
    let first = acc
        .next_hello(None)
        .context("waiting for the migration connection")?;
    let peer = first.peer;
    let mut dest = LiveDestination::new(console(&args.console_log)?);
    if let Some(s) = seed {
        dest = dest.seed(s);
    }
    if let Some(dir) = &args.storage_dir {
        if !dir.is_dir() {
            anyhow::bail!("--storage-dir {}: not a directory", dir.display());
        }
        dest = dest.storage_dir(std::path::absolute(dir).unwrap_or_else(|_| dir.clone()));
    }
    let fence = match (
        &args.fence_epoch,
        &args.cluster_agent,
        &args.cluster_vm,
        &args.cluster_host,
    ) {
        (Some(e), Some(agent), Some(name), Some(me)) => {
            let f = ferry_storage::fence::Fence::new(*e, None);
            let _ = ferry_storage::fence::install(f.clone());
            let (f2, agent, name, me) = (f.clone(), agent.clone(), name.clone(), me.clone());
            dest.before_resume(move || crate::cluster::handed_over(&f2, &agent, &name, &me));
            Some(f)
        }
        _ => None,
    };
    let (tx, running) = std::sync::mpsc::channel();
    dest.on_running(move |vm| {
        if let Some(f) = fence {
            crate::api::watch_fence(vm.clone(), f);
        }
        let _ = tx.send(vm);
    });
    // Set until every page is here: in post-copy the VM runs (and is served) before that.
    let arriving = Arc::new(AtomicBool::new(true));
    let worker = {
        let arriving = arriving.clone();
        std::thread::spawn(move || {
            let mut dest = dest;
            let r = ferry_migration::engine::receive(&mut dest, first, &acc);
            arriving.store(false, Ordering::SeqCst);
            r
        })
    };
    let Ok(vm) = running.recv() else {
        // The migration ended before the VM ran here.
        let e = match worker.join() {
            Ok(Err(e)) => anyhow::anyhow!(e),
            Ok(Ok(_)) => anyhow::anyhow!("the migration ended without a VM"),
            Err(_) => anyhow::anyhow!("the migration thread panicked"),
        };
        return Err(e.context(format!("migration from {peer} failed; nothing was started")));
    };
    eprintln!("ferry: received the VM from {peer}; it runs here now");
    // The migration's end (the last handshake, or the post-copy) goes on beside the VM.
    let done = std::thread::spawn(move || match worker.join() {
        Ok(Ok(got)) => {
            eprintln!(
                "ferry: migration from {peer} complete ({} pages in {} passes over {} connections)",
                got.pages, got.passes, got.connections
            );
            if got.seed_pages > 0 {
                eprintln!(
                    "ferry: the seed gave {} pages; only those that differed came over the network",
                    got.seed_pages
                );
            }
            if let Some(f) = &got.postcopy {
                eprintln!(
                    "ferry: post-copy: {} demand faults (p50 {:.2} ms, p99 {:.2} ms), {} pages \
                     pulled, {} pushed, {} zero-filled; every page is here",
                    f.faults,
                    f.latency_p50_us as f64 / 1e3,
                    f.latency_p99_us as f64 / 1e3,
                    f.pulled,
                    f.pushed,
                    f.zero_faults
                );
            }
        }
        Ok(Err(e)) => eprintln!("ferry: error: migration from {peer}: {e}"),
        Err(_) => eprintln!("ferry: error: the migration thread panicked"),
    });
    let code = serve_and_wait(vm, listener, &args.console_log, Start::No, Some(arriving))?;
    // A VM that ended during post-copy: let the source be released if it can be soon.
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done.is_finished() && std::time::Instant::now() < until {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(code)
}

/// Prints how the guest ended (stderr) and maps it to the exit status.
pub fn report(exit: &GuestExit) -> i32 {
    match exit {
        GuestExit::PowerOff { code: 0 } | GuestExit::Stopped => 0,
        GuestExit::PowerOff { code } => {
            eprintln!("ferry: guest powered off with code {code}");
            EXIT_GUEST_ERROR
        }
        GuestExit::Reset => {
            eprintln!("ferry: guest requested a reset; VM stopped");
            EXIT_RESET
        }
        GuestExit::Crashed { reason } => {
            eprintln!("ferry: guest crashed: {reason}");
            EXIT_CRASH
        }
    }
}
