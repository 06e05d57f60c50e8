//! `cardpipe offices clients add|list|revoke`: clients of the office-facing delivery API
//! (workers/delivery/src/clients.rs). A client is bound to one pickup office (`--office`) or
//! is centre-wide (`--centre`); its bearer token is printed once and stored only as a SHA-256
//! digest. Adding and revoking need `--as LOGIN` of a console supervisor and are audited.

use cardpipe_common::backends;
use cardpipe_common::clock;
use cardpipe_common::config::LoadedConfig;
use cardpipe_delivery::clients;
use clap::Subcommand;
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{Cell, ContentArrangement, Table};

/// `cardpipe offices ...`
#[derive(Debug, Subcommand)]
pub enum OfficesCommand {
    /// Delivery API clients (offices' and the centre's systems).
    Clients {
        #[command(subcommand)]
        command: ClientsCommand,
    },
}

/// `cardpipe offices clients ...`
#[derive(Debug, Subcommand)]
pub enum ClientsCommand {
    /// Create a client and print its bearer token once.
    Add {
        /// Client name (a-z, 0-9, '-', '_', '.').
        name: String,
        /// The pickup office it acts for (a code of the offices register).
        #[arg(long, conflicts_with = "centre", required_unless_present = "centre")]
        office: Option<String>,
        /// A centre-wide client: every office, and pickup-office changes.
        #[arg(long)]
        centre: bool,
        /// The supervisor doing it (audited).
        #[arg(long = "as", env = "CARDPIPE_OPERATOR")]
        by: String,
    },
    /// List clients (never their tokens).
    List,
    /// Revoke a client: its token stops working at once.
    Revoke {
        /// Client name.
        name: String,
        /// The supervisor doing it (audited).
        #[arg(long = "as", env = "CARDPIPE_OPERATOR")]
        by: String,
    },
}

/// Runs `cardpipe offices`.
pub async fn run(loaded: LoadedConfig, command: OfficesCommand) -> anyhow::Result<()> {
    let services = backends::connect(
        &loaded.config,
        clock::for_data_dir(&loaded.config.data_dir)?,
    )
    .await?;
    let OfficesCommand::Clients { command } = command;
    let supervisor = |login: String| {
        let services = services.clone();
        let loaded = &loaded;
        async move {
            let op = crate::identity::authenticate(&services, loaded, &login, "--as").await?;
            op.require_supervisor("managing delivery API clients")?;
            anyhow::Ok(op)
        }
    };
    match command {
        ClientsCommand::Add {
            name,
            office,
            centre: _,
            by,
        } => {
            let op = supervisor(by).await?;
            let delivery = cardpipe_delivery::Delivery::new(
                &services,
                cardpipe_delivery::config::load(&loaded)?,
            )?;
            let new = clients::add(
                &delivery,
                &services,
                &name,
                office.as_deref(),
                (&op.login, op.role.as_str()),
            )
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "delivery API client {} added ({}; audited as {})",
                new.name,
                new.office_code
                    .as_deref()
                    .map_or("centre-wide".to_owned(), |o| format!("office {o}")),
                op.login
            );
            println!("bearer token (shown once, store it now): {}", new.token);
        }
        ClientsCommand::List => {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED)
                .set_content_arrangement(ContentArrangement::Dynamic)
                .set_header(["name", "office", "created by", "created at", "state"]);
            for c in clients::list(&services)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?
            {
                t.add_row(vec![
                    Cell::new(&c.name),
                    Cell::new(c.office_code.as_deref().unwrap_or("(centre-wide)")),
                    Cell::new(&c.created_by),
                    Cell::new(&c.created_at),
                    Cell::new(
                        c.revoked_at
                            .as_deref()
                            .map_or("active".to_owned(), |r| format!("revoked {r}")),
                    ),
                ]);
            }
            println!("{t}");
        }
        ClientsCommand::Revoke { name, by } => {
            let op = supervisor(by).await?;
            clients::revoke(&services, &name, (&op.login, op.role.as_str()))
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            println!(
                "delivery API client {name} revoked (audited as {})",
                op.login
            );
        }
    }
    services.store.close().await;
    Ok(())
}
