//! The backend registry: every backend by name, with a constructor that
//! either returns an instance on a chosen device or says why it is
//! unavailable on this machine.
//!
//! A backend is named on the command line as `NAME` or `NAME:DEVICE`
//! (`wgpu`, `wgpu:0`, later `cuda:1`); without a device the backend picks
//! its default (device 0 for most). Every call of [`Registry::create`] makes
//! a new instance; tensors of one instance are refused by another (see
//! [`crate::device`]).

use crate::backend::{Backend, DeviceInfo};
use crate::error::{Error, Result};

/// Builds a backend on a device (`None`: the backend's default), or returns
/// [`Error::Unavailable`] with the reason.
pub type Factory = fn(device: Option<usize>) -> Result<Box<dyn Backend>>;

/// Lists the devices a backend can run on here, in device-index order.
pub type DeviceLister = fn() -> Result<Vec<DeviceInfo>>;

/// One registered backend.
#[derive(Clone)]
pub struct Entry {
    pub name: &'static str,
    pub description: &'static str,
    pub factory: Factory,
    pub devices: DeviceLister,
}

/// Availability of a backend on this machine.
pub enum Availability {
    Available(Box<dyn Backend>),
    Unavailable(String),
}

/// A parsed backend spec: `NAME` or `NAME:DEVICE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub device: Option<usize>,
}

impl BackendSpec {
    /// Parses `NAME` or `NAME:DEVICE` (a non-negative integer).
    pub fn parse(s: &str) -> Result<BackendSpec> {
        let s = s.trim();
        match s.split_once(':') {
            None => Ok(BackendSpec {
                name: s.to_string(),
                device: None,
            }),
            Some((name, dev)) => {
                let device = dev.parse::<usize>().map_err(|_| {
                    Error::Other(format!(
                        "backend `{s}`: the device after `:` must be a non-negative integer (e.g. `{name}:0`), got `{dev}`"
                    ))
                })?;
                Ok(BackendSpec {
                    name: name.to_string(),
                    device: Some(device),
                })
            }
        }
    }
}

impl std::fmt::Display for BackendSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.device {
            None => f.write_str(&self.name),
            Some(d) => write!(f, "{}:{d}", self.name),
        }
    }
}

/// All backends compiled into this program.
#[derive(Clone, Default)]
pub struct Registry {
    entries: Vec<Entry>,
}

/// The device list of a backend with exactly one device (the host), made
/// from its factory: one entry when the backend is available.
pub fn single_device(factory: Factory) -> Result<Vec<DeviceInfo>> {
    Ok(vec![factory(None)?.info()])
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a backend; a later entry with the same name replaces the earlier one.
    pub fn register(
        &mut self,
        name: &'static str,
        description: &'static str,
        factory: Factory,
        devices: DeviceLister,
    ) {
        self.entries.retain(|e| e.name != name);
        self.entries.push(Entry {
            name,
            description,
            factory,
            devices,
        });
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.entries.iter().map(|e| e.name).collect()
    }

    /// Probes one backend (`NAME` or `NAME:DEVICE`).
    pub fn probe(&self, spec: &str) -> Result<Availability> {
        let s = BackendSpec::parse(spec)?;
        let e = self.entry(&s.name)?;
        Ok(match (e.factory)(s.device) {
            Ok(b) => Availability::Available(b),
            Err(Error::Unavailable { reason, .. }) => Availability::Unavailable(reason),
            Err(other) => Availability::Unavailable(other.to_string()),
        })
    }

    /// The devices of one backend on this machine (index order), or why
    /// there are none.
    pub fn devices(&self, name: &str) -> Result<Vec<DeviceInfo>> {
        (self.entry(name)?.devices)()
    }

    /// Creates a new instance from `NAME` or `NAME:DEVICE`, or explains why
    /// not. A device index beyond the backend's devices is an error that
    /// says how many there are.
    pub fn create(&self, spec: &str) -> Result<Box<dyn Backend>> {
        let s = BackendSpec::parse(spec)?;
        (self.entry(&s.name)?.factory)(s.device)
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

/// The error for a device index a backend does not have.
pub fn no_such_device(backend: &str, device: usize, count: usize) -> Error {
    Error::Unavailable {
        backend: format!("{backend}:{device}"),
        reason: match count {
            0 => "no device of this backend on this machine".into(),
            1 => "this machine has one device of this backend (index 0)".into(),
            n => format!("this machine has {n} devices of this backend (indices 0..{n})"),
        },
    }
}
