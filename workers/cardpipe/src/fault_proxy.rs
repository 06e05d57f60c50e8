//! A TCP proxy that can take a service away: the chaos run's PostgreSQL, RabbitMQ and S3
//! faults.
//!
//! `cardpipe bench chaos` puts one [`FaultProxy`] in front of each service of its topology
//! and gives the processes the proxy's address instead of the service's. [`FaultProxy::outage`]
//! then does to every process at once what a restart or a network partition does: every open
//! connection is cut (both directions, mid-query or mid-frame), and for the outage's length a
//! new connection is closed as soon as it is accepted. After it, connections pass again.
//!
//! Why a proxy and not a real restart: PostgreSQL, RabbitMQ and the S3 server on a developer
//! machine or the CI runner are shared with every other test running at the same time; to the
//! processes under test a restart *is* the cut connections and the refused reconnects (a
//! committed transaction and a durable queue survive either way, in-flight ones do not).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One proxied service.
pub struct FaultProxy {
    name: &'static str,
    listen: SocketAddr,
    down: Arc<AtomicBool>,
    /// Bumped at every outage: connections of an older generation end themselves.
    generation: watch::Sender<u64>,
    cut: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream`.
    pub async fn start(name: &'static str, upstream: String) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen = listener.local_addr()?;
        let down = Arc::new(AtomicBool::new(false));
        let (generation, _) = watch::channel(0u64);
        let cut = Arc::new(AtomicU64::new(0));
        let task = {
            let (down, generation, cut) = (down.clone(), generation.clone(), cut.clone());
            tokio::spawn(async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    if down.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    let mut gen_rx = generation.subscribe();
                    let upstream = upstream.clone();
                    let cut = cut.clone();
                    tokio::spawn(async move {
                        let _ = client.set_nodelay(true);
                        let Ok(server) = TcpStream::connect(&upstream).await else {
                            return;
                        };
                        let _ = server.set_nodelay(true);
                        let (mut client, mut server) = (client, server);
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = gen_rx.changed() => {
                                cut.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            })
        };
        Ok(Self {
            name,
            listen,
            down,
            generation,
            cut,
            task,
        })
    }

    /// The service's name (`postgresql`, `rabbitmq`, `s3`).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// `host:port` the processes connect to.
    pub fn addr(&self) -> String {
        self.listen.to_string()
    }

    /// Connections cut by outages so far.
    pub fn connections_cut(&self) -> u64 {
        self.cut.load(Ordering::Relaxed)
    }

    /// Cuts every connection and refuses new ones for `length`, then lets them through again.
    pub async fn outage(&self, length: Duration) {
        self.down.store(true, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
        tokio::time::sleep(length).await;
        self.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `url` with its `host:port` replaced by `addr` (user info, path and query kept).
pub fn rewrite_host(url: &str, addr: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let (userinfo, hostpart) = match rest.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, rest),
    };
    let tail = hostpart.find(['/', '?']).map_or("", |i| &hostpart[i..]);
    match userinfo {
        Some(u) => format!("{scheme}://{u}@{addr}{tail}"),
        None => format!("{scheme}://{addr}{tail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn rewrite_keeps_user_path_and_query() {
        assert_eq!(
            rewrite_host("postgres://u:p@127.0.0.1:5432/db?x=1", "127.0.0.1:9"),
            "postgres://u:p@127.0.0.1:9/db?x=1"
        );
        assert_eq!(
            rewrite_host("amqp://127.0.0.1:5672/%2f", "127.0.0.1:9"),
            "amqp://127.0.0.1:9/%2f"
        );
        assert_eq!(
            rewrite_host("http://127.0.0.1:8014", "127.0.0.1:9"),
            "http://127.0.0.1:9"
        );
    }

    /// An echo server behind the proxy: bytes pass, an outage cuts the open connection and
    /// refuses new ones, and afterwards a new connection passes again.
    #[tokio::test]
    async fn an_outage_cuts_and_refuses_then_heals() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = echo.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = Arc::new(FaultProxy::start("echo", upstream).await.unwrap());
        let mut open = TcpStream::connect(proxy.addr()).await.unwrap();
        open.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        open.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"ping");

        let outage = tokio::spawn({
            let proxy = proxy.clone();
            async move { proxy.outage(Duration::from_millis(600)).await }
        });
        // The open connection ends (EOF or reset), whatever it was doing.
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(5), open.read_to_end(&mut rest))
            .await
            .expect("the open connection is cut");
        assert!(ended.map_or(true, |n| n == 0), "nothing more comes through");
        // A new connection during the outage is closed at once.
        let mut during = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = during.write_all(b"x").await;
        let mut one = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), during.read(&mut one))
            .await
            .expect("closed, not hanging");
        assert!(n.map_or(true, |n| n == 0));
        outage.await.unwrap();
        assert_eq!(proxy.connections_cut(), 1);

        let mut after = TcpStream::connect(proxy.addr()).await.unwrap();
        after.write_all(b"back").await.unwrap();
        after.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"back");
    }
}
