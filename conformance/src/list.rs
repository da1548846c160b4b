//! `deepport list`: every registered backend, available or why not.

use deepport_core::registry::{Availability, Registry};

/// One row of `deepport list`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRow {
    pub name: String,
    pub description: String,
    /// `None` when available, else the reason it is not.
    pub unavailable: Option<String>,
    pub device: String,
    pub driver: String,
    pub vendor: String,
}

impl BackendRow {
    pub fn available(&self) -> bool {
        self.unavailable.is_none()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.name,
            "description": self.description,
            "available": self.available(),
            "reason": self.unavailable,
            "device": self.device,
            "driver": self.driver,
            "vendor": self.vendor,
        })
    }
}

/// Probes every backend of the registry: one row per device (named
/// `NAME:N`, what `--backend` accepts), or one row saying why the backend
/// has no device here.
pub fn probe_all(reg: &Registry) -> Vec<BackendRow> {
    let mut rows = Vec::new();
    for e in reg.entries() {
        let row = |name: String| BackendRow {
            name,
            description: e.description.to_string(),
            unavailable: None,
            device: String::new(),
            driver: String::new(),
            vendor: String::new(),
        };
        match reg.devices(e.name) {
            Ok(devices) if !devices.is_empty() => {
                for (i, info) in devices.into_iter().enumerate() {
                    let mut r = row(format!("{}:{i}", e.name));
                    // Listing a device does not prove it runs: create it.
                    match reg.probe(&r.name) {
                        Ok(Availability::Available(b)) => {
                            let info = b.info();
                            r.device = info.device;
                            r.driver = info.driver;
                            r.vendor = info.vendor;
                        }
                        Ok(Availability::Unavailable(reason)) => {
                            r.device = info.device;
                            r.unavailable = Some(reason);
                        }
                        Err(err) => r.unavailable = Some(err.to_string()),
                    }
                    rows.push(r);
                }
            }
            Ok(_) => {
                let mut r = row(e.name.to_string());
                r.unavailable = Some("no device found".into());
                rows.push(r);
            }
            Err(err) => {
                let mut r = row(e.name.to_string());
                r.unavailable = Some(match err {
                    deepport_core::Error::Unavailable { reason, .. } => reason,
                    other => other.to_string(),
                });
                rows.push(r);
            }
        }
    }
    rows
}

/// The rows as an aligned text table.
pub fn table(rows: &[BackendRow]) -> String {
    let header = ["BACKEND", "STATUS", "DEVICE", "DRIVER"];
    let cells: Vec<[String; 4]> = rows
        .iter()
        .map(|r| {
            [
                r.name.clone(),
                match &r.unavailable {
                    None => "available".to_string(),
                    Some(why) => format!("unavailable: {why}"),
                },
                r.device.clone(),
                r.driver.clone(),
            ]
        })
        .collect();
    let mut w = header.map(|h| h.chars().count());
    for c in &cells {
        for (i, s) in c.iter().enumerate() {
            w[i] = w[i].max(s.chars().count());
        }
    }
    let line = |c: [&str; 4]| {
        let mut s = String::new();
        for (i, x) in c.iter().enumerate() {
            if i + 1 == c.len() {
                s.push_str(x);
            } else {
                s.push_str(x);
                s.push_str(&" ".repeat(w[i] - x.chars().count() + 2));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    for c in &cells {
        out.push_str(&line([&c[0], &c[1], &c[2], &c[3]]));
    }
    if rows.is_empty() {
        out.push_str("(no backends compiled into this build)\n");
    }
    out
}
