//! The agent's lifecycle: load, attach, drain on a timer, detach and drain
//! one last time on shutdown, so that nothing counted is lost.

use std::collections::HashMap;

use ntm_common::Counters;

use crate::{
    attach::{self, AttachError, Attachment},
    config::{Config, ConfigError},
    datapath::{Datapath, DatapathError, DatapathOptions},
    drain::{Drained, FlowTables},
    flows::FlowTotals,
    services::{ServiceRegistry, ServicesError},
};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Services(#[from] ServicesError),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("draining the flow tables failed: {0}")]
    Drain(#[from] crate::drain::DrainError),
}

pub struct Agent {
    datapath: Datapath,
    tables: FlowTables,
    attachments: Vec<Attachment>,
    pub totals: FlowTotals,
    pub services: ServiceRegistry,
}

impl Agent {
    /// Loads the programs and attaches them to every configured interface.
    /// On any error nothing stays attached.
    pub fn start(config: &Config) -> Result<Self, AgentError> {
        let interfaces = config.resolved_interfaces()?;
        let mut services = ServiceRegistry::from_file(&config.services_file)?;
        for spec in &config.services {
            services.add_spec(spec)?;
        }
        let options = DatapathOptions {
            flow_table_entries: config.flow_table_size,
            ephemeral_start: config.ephemeral_start,
        };
        let (datapath, tables) = Datapath::load(&options, &services)?;
        let mut agent = Self {
            datapath,
            tables,
            attachments: Vec::new(),
            totals: FlowTotals::default(),
            services,
        };
        for iface in &interfaces {
            // Check every name before attaching anything.
            attach::inspect(iface)?;
        }
        for iface in &interfaces {
            match attach::attach(&mut agent.datapath, iface, config.attach_mode) {
                Ok(a) => agent.attachments.push(a),
                Err(e) => {
                    agent.detach_all();
                    return Err(e.into());
                }
            }
        }
        Ok(agent)
    }

    /// Drains the kernel's tables into the running totals.
    pub fn drain(&mut self) -> Result<Drained, AgentError> {
        let drained = self.tables.drain()?;
        self.totals.apply(&drained);
        Ok(drained)
    }

    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// Detaches everywhere, then drains twice: once for the table that was
    /// active, once for the other, so every packet counted before the detach
    /// reaches the totals.
    pub fn shutdown(mut self) -> Result<FlowTotals, AgentError> {
        self.detach_all();
        self.drain()?;
        self.drain()?;
        Ok(self.totals)
    }

    fn detach_all(&mut self) {
        for attachment in &mut self.attachments {
            attach::detach(&mut self.datapath, attachment);
        }
        self.attachments.clear();
    }

    /// Interface names by index, for reports.
    pub fn interface_names(&self) -> HashMap<u32, String> {
        self.attachments
            .iter()
            .map(|a| (a.ifindex, a.iface.clone()))
            .collect()
    }

    pub fn grand_total(&self) -> Counters {
        self.totals.grand_total()
    }
}
