//! Control API: HTTP/JSON over a Unix socket (`--api-socket`), and its CLI client.
//!
//! | method | path          | answer                                      |
//! |--------|---------------|---------------------------------------------|
//! | GET    | /vm           | 200, VmInfo (state, config, uptime, exit)    |
//! | PUT    | /vm/pause     | 204; 409 when not running                    |
//! | PUT    | /vm/resume    | 204; 409 when not paused                     |
//! | PUT    | /vm/shutdown  | 204; 409 when already shut down              |
//! Errors carry `{"error": "..."}`.
pub mod client;
pub mod server;
