//! The queue form of the MOSIP ABIS API on RabbitMQ.
//!
//! MOSIP's registration processor talks to each ABIS through a pair of ActiveMQ queues
//! named in `registration-processor-abis.json` (`outboundQueueName`: MOSIP → ABIS,
//! `inboundQueueName`: ABIS → MOSIP; `typeOfMessage` text or bytes). Here the pair is two
//! durable RabbitMQ queues, `[abis.queue] inbound` (requests) and `outbound` (responses),
//! on the default exchange; a message body is the JSON message, a text message as UTF-8.
//! MOSIP reaches them either directly (RabbitMQ 4 speaks AMQP 1.0 natively, the protocol of
//! MOSIP's JMS client for ActiveMQ Artemis) or through a shovel/bridge from its ActiveMQ
//! queues; see the README, "MOSIP ABIS API".
//!
//! Requests are taken one at a time (prefetch 1) in queue order, so an identify sees every
//! insert queued before it. Each response is published persistent with a publisher
//! confirm, carrying the request's `correlation_id` (or the requestId) and `message_id`,
//! and only then is the request acknowledged: a crash in between redelivers the request,
//! whose recorded answer is sent again (the same response twice is harmless to MOSIP,
//! which matches responses by requestId). The connection recovers by itself (lapin's
//! auto-recovery) or is opened again.

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use super::MosipAbis;
use futures::StreamExt;

/// Consumes the inbound queue until `stop`, reconnecting after broker outages.
pub async fn run(abis: Arc<MosipAbis>, stop: CancellationToken) -> anyhow::Result<()> {
    let mut backoff = Duration::from_millis(500);
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = consume(abis.clone(), stop.clone()) => r,
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(err) => {
                tracing::warn!(error = %format!("{err:#}"), retry_in = ?backoff, "MOSIP ABIS queue: connection lost; reconnecting");
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(15));
            }
        }
    }
}

async fn consume(abis: Arc<MosipAbis>, stop: CancellationToken) -> anyhow::Result<()> {
    let cfg = abis.config.queue.clone();
    let connection = Connection::connect(
        cfg.url.expose_secret(),
        ConnectionProperties::default().enable_auto_recover(),
    )
    .await
    .map_err(|e| anyhow::anyhow!("connecting to the ABIS queue broker: {e}"))?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    for queue in [&cfg.inbound, &cfg.outbound] {
        channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("declaring queue {queue}: {e}"))?;
    }
    channel
        .basic_qos(1, BasicQosOptions { global: false })
        .await?;
    let mut consumer = channel
        .basic_consume(
            cfg.inbound.as_str().into(),
            format!("cardpipe-abis-{}", uuid::Uuid::new_v4()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    tracing::info!(inbound = %cfg.inbound, outbound = %cfg.outbound, "MOSIP ABIS queue pair consumed");
    loop {
        let delivery = tokio::select! {
            _ = stop.cancelled() => {
                let _ = channel.close(200, "shutting down".into()).await;
                return Ok(());
            }
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else {
            anyhow::bail!("the inbound consumer was cancelled by the broker");
        };
        let delivery = delivery?;
        let response = abis.handle(&delivery.data).await;
        let request_id = response
            .get("requestId")
            .and_then(|v| v.as_str())
            .unwrap_or("")
            .to_owned();
        let correlation = delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_else(|| request_id.clone());
        let content_type = if cfg.text_messages {
            "text/plain; charset=utf-8"
        } else {
            "application/json"
        };
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type(content_type.into())
            .with_correlation_id(correlation.into())
            .with_message_id(uuid::Uuid::new_v4().to_string().into());
        let body = serde_json::to_vec(&response).expect("a response serialises");
        let confirm = channel
            .basic_publish(
                "".into(),
                cfg.outbound.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                properties,
            )
            .await?
            .await?;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => {}
            other => anyhow::bail!(
                "the broker did not take the response to request {request_id} ({other:?}); the \
                 request will be redelivered"
            ),
        }
        delivery.acker.ack(BasicAckOptions::default()).await?;
    }
}
