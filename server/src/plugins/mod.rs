//! The plugin door: what a learning plugin gets from the host, and how it runs.
//!
//! A plugin runs on its own thread beside serving. Through its [`PluginHost`] it reads the
//! labelled trajectory groups, evaluates stored denoising steps under adapters with the
//! sampler's own step math, publishes adapter generations and swaps the live one, registers
//! metrics, and yields to requests. It never blocks a request: the model's weights are read-only
//! and adapters are applied unmerged. It reports through a [`TrainingControl`], which the
//! Adapters RPCs (`GetTrainingStatus`, `TriggerTraining`) read without knowing which algorithm
//! runs.
//!
//! Adding a learning algorithm: a module beside `d3po/` implementing [`Plugin`], its flags as a
//! field of [`PluginsConfig`] (behind a cargo feature if it brings a dependency), and one arm in
//! [`PluginsConfig::trainer`]. Nothing else in the server names a plugin.

mod control;
#[cfg(feature = "d3po")]
mod d3po;
mod host;

use std::sync::Arc;

pub use control::{TrainingControl, TrainingStatus};
#[cfg(feature = "d3po")]
pub use d3po::D3poConfig;
pub(crate) use host::TrainingGate;
pub use host::{PluginHost, Transitions};

/// A learning plugin.
pub trait Plugin: Send + 'static {
    /// A short name for logs and metrics.
    fn name(&self) -> &'static str;

    /// Runs until `host.stopping()`; called on the plugin's own thread.
    fn run(self: Box<Self>, host: PluginHost);
}

/// The flags of every learning plugin compiled in.
#[derive(Debug, Clone, clap::Args)]
pub struct PluginsConfig {
    /// D3PO training settings (`--d3po-*`).
    #[cfg(feature = "d3po")]
    #[command(flatten)]
    pub d3po: d3po::D3poConfig,
}

impl PluginsConfig {
    /// Checks the enabled plugins' settings; the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        #[cfg(feature = "d3po")]
        if self.d3po.enabled {
            self.d3po.validate()?;
        }
        Ok(())
    }

    /// The training plugin to run, if one is enabled, reporting through `control`.
    pub(crate) fn trainer(&self, control: &Arc<TrainingControl>) -> Option<Box<dyn Plugin>> {
        #[cfg(feature = "d3po")]
        if self.d3po.enabled {
            return Some(Box::new(d3po::D3poPlugin::new(
                self.d3po.clone(),
                control.clone(),
            )));
        }
        let _ = control;
        None
    }
}
