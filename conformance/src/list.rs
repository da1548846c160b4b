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

/// Probes every backend of the registry.
pub fn probe_all(reg: &Registry) -> Vec<BackendRow> {
    reg.entries()
        .iter()
        .map(|e| {
            let mut row = BackendRow {
                name: e.name.to_string(),
                description: e.description.to_string(),
                unavailable: None,
                device: String::new(),
                driver: String::new(),
                vendor: String::new(),
            };
            match reg.probe(e.name) {
                Ok(Availability::Available(b)) => {
                    let info = b.info();
                    row.device = info.device;
                    row.driver = info.driver;
                    row.vendor = info.vendor;
                }
                Ok(Availability::Unavailable(reason)) => row.unavailable = Some(reason),
                Err(err) => row.unavailable = Some(err.to_string()),
            }
            row
        })
        .collect()
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
