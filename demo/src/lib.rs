//! `sluice-demo`: what `sluice-api --demo` and the compose stack run besides Sluice itself —
//! an echo backend that speaks HTTP/1.1, h2c or TLS ([`echo`]), throwaway certificates
//! ([`certs`]), and the seed scenario as a declarative document ([`seed`]).

pub mod certs;
pub mod echo;
pub mod seed;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::certs::DemoCerts;
use crate::echo::Protocol;
use crate::seed::Addresses;

/// The in-process demo backends; dropping this stops them.
#[derive(Debug)]
pub struct DemoBackends {
    pub addresses: Addresses,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for DemoBackends {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn spawn(
    name: &str,
    protocol: Protocol,
    tls: Option<(String, String)>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let name = name.to_owned();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = echo::serve(listener, name.clone(), protocol, tls).await {
            tracing::error!(backend = %name, error = %e, "demo backend stopped");
        }
    }));
    Ok(addr)
}

impl DemoBackends {
    /// Two HTTP/1.1 redmine backends, two TLS odoo backends with their own certificate, one
    /// h2c backend; all on loopback ports chosen by the system.
    pub async fn start(certs: &DemoCerts) -> anyhow::Result<DemoBackends> {
        let mut tasks = Vec::new();
        let odoo_tls = Some((certs.odoo_chain.clone(), certs.odoo_key.clone()));
        let addresses = Addresses {
            redmine: vec![
                spawn("redmine-1", Protocol::Http, None, &mut tasks).await?,
                spawn("redmine-2", Protocol::Http, None, &mut tasks).await?,
            ],
            odoo: vec![
                spawn("odoo-1", Protocol::Tls, odoo_tls.clone(), &mut tasks).await?,
                spawn("odoo-2", Protocol::Tls, odoo_tls, &mut tasks).await?,
            ],
            grpc: vec![spawn("grpc-1", Protocol::H2c, None, &mut tasks).await?],
        };
        Ok(DemoBackends { addresses, tasks })
    }
}
