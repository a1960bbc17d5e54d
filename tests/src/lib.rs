//! Helpers for end-to-end tests: a server on `127.0.0.1:0` serving the tiny random-weight model
//! (fast; the API and learning tests need no trained model) or the built-in trained one, and
//! clients for it.

use anyhow::Context;
use imagegen_proto::v1::admin_client::AdminClient;
use imagegen_proto::v1::image_generator_client::ImageGeneratorClient;
use imagegen_server::config::ServeConfig;
use imagegen_server::server::{RunningServer, load_model, start};
use tonic::transport::Channel;

/// A running test server and a channel to it.
#[derive(Debug)]
pub struct TestServer {
    /// The server.
    pub server: RunningServer,
    /// A connected channel.
    pub channel: Channel,
    /// Holds the tiny model's files while the server runs.
    _model_dir: Option<tempfile::TempDir>,
}

impl TestServer {
    /// Starts a server with the tiny model (id `tiny`) on ephemeral loopback ports; `configure`
    /// adjusts the defaults.
    pub async fn start(configure: impl FnOnce(&mut ServeConfig)) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let model = dir.path().join("tiny");
        imagegen_server::tiny::write_tiny_model(&model, 0)?;
        Self::start_with(Some(dir), |c| {
            c.model = Some(model);
            configure(c);
        })
        .await
    }

    /// Starts a server with the built-in trained model.
    pub async fn start_builtin(configure: impl FnOnce(&mut ServeConfig)) -> anyhow::Result<Self> {
        Self::start_with(None, configure).await
    }

    async fn start_with(
        model_dir: Option<tempfile::TempDir>,
        configure: impl FnOnce(&mut ServeConfig),
    ) -> anyhow::Result<Self> {
        let mut config = ServeConfig::defaults()?;
        config.grpc_addr = "127.0.0.1:0".parse()?;
        config.metrics_addr = "127.0.0.1:0".parse()?;
        configure(&mut config);
        // A test that names no data directory keeps nothing on disk.
        if config.data_dir.is_none() {
            config.ephemeral = true;
        }
        let model = load_model(&config)?;
        let server = start(&config, model).await?;
        let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))?
            .connect()
            .await
            .context("connecting to the test server")?;
        Ok(Self {
            server,
            channel,
            _model_dir: model_dir,
        })
    }

    /// A generation client.
    pub fn generator(&self) -> ImageGeneratorClient<Channel> {
        ImageGeneratorClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    /// An adapters client.
    pub fn adapters(&self) -> imagegen_proto::v1::adapters_client::AdaptersClient<Channel> {
        imagegen_proto::v1::adapters_client::AdaptersClient::new(self.channel.clone())
            .max_decoding_message_size(64 << 20)
    }

    /// An admin client.
    pub fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }

    /// The text of `/metrics`.
    pub async fn scrape(&self) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.server.metrics_addr).await?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response
            .split_once("\r\n\r\n")
            .context("malformed HTTP response")?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "metrics answered {head}");
        Ok(body.to_string())
    }

    /// The value of a metric line `name{labels} value` (labels as printed), if present.
    pub async fn metric(&self, series: &str) -> anyhow::Result<Option<f64>> {
        let text = self.scrape().await?;
        Ok(text.lines().find_map(|l| {
            l.strip_prefix(series)
                .and_then(|rest| rest.trim().parse().ok())
        }))
    }
}
