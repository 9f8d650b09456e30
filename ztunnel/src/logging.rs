//! Log setup and the runtime log level behind the admin endpoint's `/logging`.
//!
//! The filter is an `EnvFilter` directive list (`info`, `info,ztunnel::proxy=debug`, ...)
//! behind a reload handle, so an operator can turn one module up during an incident without a
//! restart. [`LogControl`] keeps the current text so it can be read back and edited per module.

use std::sync::{Arc, Mutex};

use tracing_subscriber::EnvFilter;
use tracing_subscriber::reload;

use crate::config::LogFormat;

type Reload = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;

/// Reads and changes the process's log filter.
#[derive(Clone)]
pub struct LogControl {
    current: Arc<Mutex<String>>,
    reload: Arc<Reload>,
}

impl std::fmt::Debug for LogControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogControl")
            .field("current", &self.filter())
            .finish_non_exhaustive()
    }
}

fn parse(filter: &str) -> Result<EnvFilter, String> {
    EnvFilter::try_new(filter).map_err(|e| format!("invalid log filter {filter:?}: {e}"))
}

impl LogControl {
    /// Installs the global subscriber writing to stderr.
    pub fn init(filter: &str, format: LogFormat) -> Result<Self, String> {
        use std::io::IsTerminal;
        use tracing_subscriber::prelude::*;
        let (layer, handle) = reload::Layer::new(parse(filter)?);
        // Colour only for a person at a terminal; log collectors get plain text.
        let ansi = std::io::stderr().is_terminal();
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi);
        let registry = tracing_subscriber::registry().with(layer);
        let installed = match format {
            LogFormat::Json => registry.with(fmt.json().flatten_event(true)).try_init(),
            LogFormat::Text => registry.with(fmt).try_init(),
        };
        installed.map_err(|e| format!("installing the logger: {e}"))?;
        Ok(Self::with_reload(filter, move |f| {
            handle.reload(f).map_err(|e| e.to_string())
        }))
    }

    /// A control that applies filters through `reload` (tests use a no-op).
    pub fn with_reload(
        filter: &str,
        reload: impl Fn(EnvFilter) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        Self {
            current: Arc::new(Mutex::new(filter.to_string())),
            reload: Arc::new(Box::new(reload)),
        }
    }

    /// The filter in force.
    pub fn filter(&self) -> String {
        self.current.lock().expect("not poisoned").clone()
    }

    /// Replaces the whole filter.
    pub fn set(&self, filter: &str) -> Result<String, String> {
        let parsed = parse(filter)?;
        let mut current = self.current.lock().expect("not poisoned");
        (self.reload)(parsed)?;
        *current = filter.to_string();
        Ok(current.clone())
    }

    /// Sets one module's level, keeping every other directive.
    pub fn set_module(&self, module: &str, level: &str) -> Result<String, String> {
        let ok_module = !module.is_empty()
            && module
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-'));
        if !ok_module {
            return Err(format!("{module:?} is not a module path"));
        }
        if level
            .parse::<tracing::level_filters::LevelFilter>()
            .is_err()
        {
            return Err(format!(
                "{level:?} is not a level (off, error, warn, info, debug, trace)"
            ));
        }
        let current = self.filter();
        let mut directives: Vec<String> = current
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty() && d.split('=').next() != Some(module))
            .map(str::to_string)
            .collect();
        directives.push(format!("{module}={level}"));
        self.set(&directives.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_levels_edit_the_directive_list() {
        let log = LogControl::with_reload("info,access=off", |_| Ok(()));
        assert_eq!(
            log.set_module("ztunnel::proxy", "debug").unwrap(),
            "info,access=off,ztunnel::proxy=debug"
        );
        assert_eq!(
            log.set_module("access", "info").unwrap(),
            "info,ztunnel::proxy=debug,access=info"
        );
        assert!(log.set_module("access", "loud").is_err());
        assert!(log.set_module("a=b,c", "info").is_err());
        assert!(log.set("info,[bad").is_err());
        assert_eq!(log.filter(), "info,ztunnel::proxy=debug,access=info");
        assert_eq!(log.set("warn").unwrap(), "warn");
    }
}
