//! The backend registry: every backend by name, with a constructor that
//! either returns it or says why it is unavailable on this machine.

use crate::backend::Backend;
use crate::error::{Error, Result};

/// Builds a backend, or returns [`Error::Unavailable`] with the reason.
pub type Factory = fn() -> Result<Box<dyn Backend>>;

/// One registered backend.
#[derive(Clone)]
pub struct Entry {
    pub name: &'static str,
    pub description: &'static str,
    pub factory: Factory,
}

/// Availability of a backend on this machine.
pub enum Availability {
    Available(Box<dyn Backend>),
    Unavailable(String),
}

/// All backends compiled into this program.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Vec<Entry>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a backend; a later entry with the same name replaces the earlier one.
    pub fn register(&mut self, name: &'static str, description: &'static str, factory: Factory) {
        self.entries.retain(|e| e.name != name);
        self.entries.push(Entry {
            name,
            description,
            factory,
        });
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }

    /// Probes one backend.
    pub fn probe(&self, name: &str) -> Result<Availability> {
        let e = self.entry(name)?;
        Ok(match (e.factory)() {
            Ok(b) => Availability::Available(b),
            Err(Error::Unavailable { reason, .. }) => Availability::Unavailable(reason),
            Err(other) => Availability::Unavailable(other.to_string()),
        })
    }

    /// Creates a backend by name, or explains why not.
    pub fn create(&self, name: &str) -> Result<Box<dyn Backend>> {
        (self.entry(name)?.factory)()
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::UnknownBackend {
                name: name.to_string(),
                known: self.names().join(", "),
            })
    }
}
