//! Command-line flags every binary shares: which config file to load and the
//! `--check-config` mode that CI runs on every file under `deploy/`.

use std::path::PathBuf;

use crate::config::{Config, ConfigError};

/// Flatten into a binary's clap parser with `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigArgs {
    /// TOML configuration file; without it, built-in defaults plus
    /// SECKILL__* environment variables.
    #[arg(long, short = 'c', env = "SECKILL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print the result and exit.
    #[arg(long, global = true)]
    pub check_config: bool,
}

impl ConfigArgs {
    /// Loads the configuration. In `--check-config` mode prints the verdict
    /// and exits the process (0 valid, 2 invalid), so a binary's `main` needs
    /// no special case.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let result = Config::load(self.config.as_deref());
        if self.check_config {
            let name = self
                .config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "(defaults + environment)".into());
            match &result {
                Ok(_) => {
                    println!("{name}: ok");
                    std::process::exit(0);
                }
                Err(e) => {
                    eprintln!("{name}: {e}");
                    std::process::exit(2);
                }
            }
        }
        result
    }
}
