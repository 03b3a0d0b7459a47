//! Throwaway etcd clusters for tests: Debian's etcd-server (scripts/setup.sh installs it),
//! one or three members on loopback, data in a temporary directory.
#![allow(dead_code)]
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Etcd {
    members: Vec<Option<Child>>,
    pub clients: Vec<String>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Etcd {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let c = format!("http://127.0.0.1:{client}");
                let p = format!("http://127.0.0.1:{peer}");
                let data = dir.path().join(format!("m{i}"));
                Some(
                    Command::new("etcd")
                        .args(["--name", &format!("m{i}")])
                        .args(["--data-dir", data.to_str().unwrap()])
                        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                        .args([
                            "--listen-peer-urls",
                            &p,
                            "--initial-advertise-peer-urls",
                            &p,
                        ])
                        .args([
                            "--initial-cluster",
                            &cluster,
                            "--initial-cluster-state",
                            "new",
                        ])
                        .arg("--unsafe-no-fsync")
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("etcd (Debian etcd-server; scripts/setup.sh installs it)"),
                )
            })
            .collect();
        let clients: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("http://127.0.0.1:{c}"))
            .collect();
        let e = Etcd {
            members,
            clients,
            _dir: dir,
        };
        e.wait_healthy();
        e
    }

    /// Until every member answers a linearizable read.
    fn wait_healthy(&self) {
        let t = Instant::now();
        for c in &self.clients {
            loop {
                let ok = ferry_cluster::store::EtcdStore::connect(std::slice::from_ref(c))
                    .and_then(|s| ferry_cluster::Store::get(&s, "/health"))
                    .is_ok();
                if ok {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "etcd did not come up"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// The member that leads now (etcd's JSON gateway, `/v3/maintenance/status`).
    pub fn leader(&self) -> usize {
        use std::io::{Read, Write};
        let status = |c: &str| -> Option<(String, String)> {
            let addr = c.trim_start_matches("http://");
            let mut s = std::net::TcpStream::connect(addr).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let req = format!(
                "POST /v3/maintenance/status HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                 Content-Length: 2\r\n\r\n{{}}"
            );
            s.write_all(req.as_bytes()).ok()?;
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            let body = out.split("\r\n\r\n").nth(1)?;
            let v: serde_json::Value = serde_json::from_str(body).ok()?;
            Some((
                v["header"]["member_id"].as_str()?.to_string(),
                v["leader"].as_str()?.to_string(),
            ))
        };
        let t = Instant::now();
        loop {
            let ids: Vec<_> = self.clients.iter().map(|c| status(c)).collect();
            if let Some(lead) = ids.iter().flatten().map(|(_, l)| l.clone()).next() {
                if let Some(i) = ids
                    .iter()
                    .position(|x| x.as_ref().is_some_and(|(m, _)| *m == lead))
                {
                    return i;
                }
            }
            assert!(t.elapsed() < Duration::from_secs(10), "no etcd leader");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills member `i` (SIGKILL).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
