//! Control API: HTTP/JSON over a Unix socket (`--api-socket`), and its CLI client.
//!
//! | method | path          | body | answer |
//! |--------|---------------|------|--------|
//! | GET    | /vm           | | 200 VmInfo (state, config, uptime, exit, host_lacks) |
//! | PUT    | /vm/pause     | | 204; 409 when not running, or while a live migration runs |
//! | PUT    | /vm/resume    | | 204; 409 when not paused, while a live migration runs, or once a fence deadline has passed |
//! | PUT    | /vm/shutdown  | | 204; 409 when already shut down, or while a live migration runs |
//! | PUT    | /vm/seed      | `{"to": DIR, "update": bool}` | 200 report (`rounds` copied while the VM ran, `paused_ms`, `paused_pages`): a seed, the VM running on (docs/seeding.md); 409 while a migration runs or the VM is not running |
//! | PUT    | /vm/snapshot  | `{"to": DIR, "diff": bool, "then": "resume"\|"pause"\|"stop"}` | 200 report; 409 while a live migration runs or the VM still arrives by post-copy |
//! | PUT    | /vm/migrate   | `{"to": "HOST:PORT", "downtime_limit_ms", "max_passes", "compress": "none"\|"lz4"\|"zstd", "max_bandwidth", "connections", "auto_converge", "timeout_ms", "on_timeout": "cancel"\|"switch_over", "postcopy_after": PASSES, "auto_postcopy": bool, "copy_priority": "low"\|"normal", "seeded": bool}` | 200 report (with `postcopy` figures when it went by post-copy); the VM then stops here; 409 when cancelled, another migration runs, or the VM still arrives by post-copy |
//! | GET    | /vm/migration | | 200 progress of the running or last migration (phase incl. `post_copy` / `post_copy_paused`, pass, pages, rate, ETA, throttle, report or error); 404 when none ran |
//! | PUT    | /vm/migration/cancel | | 202; the migration rolls back (unless committed); 409 when none runs or it is in post-copy |
//! | PUT    | /vm/migration/resume-postcopy | `{"to": "HOST:PORT"}` (optional) | 202; a post-copy whose link broke reconnects now (to `to` from now on); 409 when no post-copy runs |
//! | PUT    | /vm/disk/move | `{"disk": ID, "to": PATH, "format": "raw"\|"qcow2"\|"vhdx"}` (format optional) | 200 report (from, to, copied and mirrored bytes, total ms, pivot µs); the VM runs on the new file; 404 no such disk; 400 bad target; 409 when cancelled, another move or a migration runs |
//! | GET    | /vm/disk/move | | 200 progress of the running or last move (phase, size, cursor, copied, mirrored, elapsed, error); 404 when none ran |
//! | PUT    | /vm/disk/move/cancel | | 202; the VM stays on its old file, the target is deleted; 409 when none runs |
//! | GET    | /vm/fence     | | 200 `{epoch, deadline_ns, now_ns, expired, refused_writes}`; 404 when the VMM is not fenced (no `--fence-epoch`) |
//! | PUT    | /vm/fence     | `{"deadline_ns": N}` (CLOCK_MONOTONIC) | 204; 409 once the deadline has passed (fenced for good); 404 not fenced |
//! | PUT    | /vm/restore   | `{"from": DIR, "lazy_check": bool}` | 200 report; 409 when the VMM has a VM |
//!
//! Without a VM (an empty VMM, `ferry run --api-socket S`) the VM routes answer 404.
//! Every error, unknown routes and wrong methods included, carries `{"error": "..."}` with
//! its status; bodies are JSON (`Content-Type: application/json`, at most 64 KiB, unknown
//! fields refused), and routes listed without a body refuse one (400).
pub mod client;
mod disk;
pub mod disk_client;
pub mod extract;
mod fence;
pub use fence::watch as watch_fence;
pub mod handlers;
pub mod host;
mod migration;
pub mod progress;
pub mod server;
