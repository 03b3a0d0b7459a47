//! The etcd backend (etcd v3 API through the `etcd-client` crate; Debian 12's etcd 3.4).
//! Calls are synchronous: each runs on the store's own single-threaded tokio runtime, with a
//! deadline; past it the store is [`StoreError::Unavailable`]. Reads are etcd's default,
//! linearizable ones.
use super::{Compare, KeyValue, LeaseId, Op, Store, StoreError, TxnResult};
use etcd_client::{Client, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use std::time::Duration;

/// How long one call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one lease renewal may take before the keeper tries again.
const KEEP_ALIVE_TRY: Duration = Duration::from_millis(500);

pub struct EtcdStore {
    rt: tokio::runtime::Runtime,
    client: Client,
    endpoints: Vec<String>,
}

impl EtcdStore {
    /// Connects to the etcd members at `endpoints` (`http://HOST:PORT`).
    pub fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        let unavailable = |why: String| StoreError::Unavailable {
            endpoint: endpoints.join(","),
            why,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| unavailable(e.to_string()))?;
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(CALL_TIMEOUT);
        let client = rt
            .block_on(async {
                tokio::time::timeout(CALL_TIMEOUT, Client::connect(endpoints, Some(opts))).await
            })
            .map_err(|_| unavailable("no answer in time".into()))?
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(EtcdStore {
            rt,
            client,
            endpoints: endpoints.to_vec(),
        })
    }

    /// Runs `f` on the runtime with the call deadline. A request that could not even be
    /// sent (no connection to the member the client picked: it is down) never reached etcd,
    /// so it is retried — on another member — until the deadline.
    fn call<T, F>(&self, f: impl FnMut(Client) -> F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_within(CALL_TIMEOUT, f)
    }

    /// As [`call`](Self::call), with the deadline `limit`.
    fn call_within<T, F>(
        &self,
        limit: Duration,
        mut f: impl FnMut(Client) -> F,
    ) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let until = tokio::time::Instant::now() + limit;
        let r = self.rt.block_on(async {
            loop {
                match tokio::time::timeout_at(until, f(self.client.clone())).await {
                    Ok(Err(e)) if not_sent(&e) && tokio::time::Instant::now() < until => {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    r => return r,
                }
            }
        });
        match r {
            Err(_) => Err(self.unavailable("no answer in time".into())),
            Ok(Err(e)) => Err(self.unavailable(e.to_string())),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn unavailable(&self, why: String) -> StoreError {
        StoreError::Unavailable {
            endpoint: self.endpoint(),
            why,
        }
    }
}

fn kv(k: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(k.key()).into_owned(),
        value: k.value().to_vec(),
        mod_revision: k.mod_revision(),
        lease: (k.lease() != 0).then_some(k.lease()),
    }
}

/// The request failed before it was sent: no connection could be made.
fn not_sent(e: &etcd_client::Error) -> bool {
    let s = e.to_string();
    s.contains("tcp connect error") || s.contains("Connection refused")
}

fn lease_gone(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable { why, .. } if why.contains("lease not found"))
}

impl Store for EtcdStore {
    fn endpoint(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }

    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_owned();
        let r = self.call(|mut c| {
            let key = key.clone();
            async move { c.get(key, None).await }
        })?;
        Ok(r.kvs().first().map(kv))
    }

    fn list(&self, prefix: &str) -> Result<Vec<KeyValue>, StoreError> {
        let prefix = prefix.to_owned();
        let r =
            self.call(|mut c| {
                let prefix = prefix.clone();
                async move {
                    c.get(
                        prefix,
                        Some(GetOptions::new().with_prefix().with_sort(
                            etcd_client::SortTarget::Key,
                            etcd_client::SortOrder::Ascend,
                        )),
                    )
                    .await
                }
            })?;
        Ok(r.kvs().iter().map(kv).collect())
    }

    fn txn(&self, when: &[Compare], then: &[Op]) -> Result<TxnResult, StoreError> {
        use etcd_client::{
            Compare as C,
            CompareOp::{Equal, Greater},
        };
        let cmps: Vec<C> = when
            .iter()
            .map(|c| match c {
                Compare::Absent(k) => C::create_revision(k.as_str(), Equal, 0),
                Compare::Present(k) => C::create_revision(k.as_str(), Greater, 0),
                Compare::ModRevision(k, r) => C::mod_revision(k.as_str(), Equal, *r),
                Compare::Value(k, v) => C::value(k.as_str(), Equal, v.clone()),
            })
            .collect();
        let ops: Vec<TxnOp> = then
            .iter()
            .map(|o| match o {
                Op::Put { key, value, lease } => TxnOp::put(
                    key.as_str(),
                    value.clone(),
                    lease.map(|l| PutOptions::new().with_lease(l)),
                ),
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
            })
            .collect();
        let lease = then.iter().find_map(|o| match o {
            Op::Put { lease, .. } => *lease,
            _ => None,
        });
        let r = self
            .call(|mut c| {
                let t = Txn::new().when(cmps.clone()).and_then(ops.clone());
                async move { c.txn(t).await }
            })
            .map_err(|e| match lease {
                Some(l) if lease_gone(&e) => StoreError::LeaseExpired(l),
                _ => e,
            })?;
        Ok(TxnResult {
            succeeded: r.succeeded(),
            revision: r.header().map_or(0, |h| h.revision()),
        })
    }

    fn grant(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = ttl.as_secs().max(1) as i64;
        let r = self.call(|mut c| async move { c.lease_grant(secs, None).await })?;
        Ok(r.id())
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<Duration, StoreError> {
        // One short try: the keeper tries again at once. A renewal that went to a member
        // just killed can hang until the connection is given up; waiting the full call
        // deadline for it would outlast a short TTL (the host would fence itself while two
        // members are alive).
        let ttl = self
            .call_within(KEEP_ALIVE_TRY, |mut c| async move {
                let (mut keeper, mut stream) = c.lease_keep_alive(lease).await?;
                keeper.keep_alive().await?;
                Ok(stream.message().await?.map_or(0, |m| m.ttl()))
            })
            .map_err(|e| {
                if lease_gone(&e) {
                    StoreError::LeaseExpired(lease)
                } else {
                    e
                }
            })?;
        if ttl <= 0 {
            return Err(StoreError::LeaseExpired(lease));
        }
        Ok(Duration::from_secs(ttl as u64))
    }

    fn revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.call(|mut c| async move { c.lease_revoke(lease).await }) {
            Ok(_) => Ok(()),
            Err(e) if lease_gone(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn revision(&self) -> Result<i64, StoreError> {
        let r = self.call(|mut c| async move {
            c.get("/", Some(GetOptions::new().with_count_only())).await
        })?;
        r.header()
            .map(|h| h.revision())
            .ok_or_else(|| self.unavailable("an answer without a header".into()))
    }

    fn wait_key(
        &self,
        key: &str,
        after: i64,
        limit: Duration,
    ) -> Result<Option<Option<KeyValue>>, StoreError> {
        let key = key.to_owned();
        let r = self.rt.block_on(async {
            tokio::time::timeout(limit, async {
                let opts = WatchOptions::new().with_start_revision(after + 1);
                let (_watcher, mut stream) =
                    self.client.clone().watch(key.clone(), Some(opts)).await?;
                loop {
                    match stream.message().await? {
                        Some(m) => {
                            if let Some(e) = m.events().first() {
                                return Ok::<_, etcd_client::Error>(match e.event_type() {
                                    etcd_client::EventType::Delete => Some(None),
                                    etcd_client::EventType::Put => e.kv().map(kv).map(Some),
                                });
                            }
                            if m.canceled() || m.compact_revision() > 0 {
                                return Ok(None);
                            }
                        }
                        None => return Ok(None),
                    }
                }
            })
            .await
        });
        match r {
            Err(_) => Ok(None),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.unavailable(e.to_string())),
        }
    }

    fn wait(&self, prefix: &str, after: i64, limit: Duration) -> Result<bool, StoreError> {
        let prefix = prefix.to_owned();
        let r = self.rt.block_on(async {
            tokio::time::timeout(limit, async {
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(after + 1);
                let (_watcher, mut stream) = self
                    .client
                    .clone()
                    .watch(prefix.clone(), Some(opts))
                    .await?;
                loop {
                    match stream.message().await? {
                        // Compacted past `after`: what changed is unknown, so say changed.
                        Some(m) if !m.events().is_empty() || m.compact_revision() > 0 => {
                            return Ok::<bool, etcd_client::Error>(true)
                        }
                        Some(m) if m.canceled() => return Ok(true),
                        Some(_) => {}
                        None => return Ok(true),
                    }
                }
            })
            .await
        });
        match r {
            Err(_) => Ok(false),
            Ok(Ok(changed)) => Ok(changed),
            Ok(Err(e)) => Err(self.unavailable(e.to_string())),
        }
    }
}
