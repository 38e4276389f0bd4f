//! The naming ladder: the sources of host names, asked in order, highest
//! rung first, until one names the address. Each source is one file of
//! this room implementing `source::NameSource`; [`ladder`] is the ordered list,
//! the one place their order is decided:
//!
//! 1. files (`files.rs`): hosts and ethers files, then DHCP lease files;
//! 2. containers on this host (`containers.rs`), then pods on this
//!    Kubernetes node and the node itself (`kubernetes/`);
//! 3. this host's own addresses, by its host name (`this_host.rs`);
//! 4. the wire (`observed.rs`): the host name a device's DHCP client sent,
//!    then the name a peer asked DNS for or sent in its handshake (which a
//!    new flow waits a moment for);
//! 5. reverse DNS (`resolver.rs`), which a new flow waits for (bounded);
//!
//! and where none names it, the address itself.
//!
//! A new source is a new file with its `impl NameSource`, a line in
//! [`ladder`] and its options in [`NameOptions`].

use super::{
    NameMetrics, NameOptions,
    containers::ContainerNames,
    files::NameFiles,
    kubernetes::KubernetesNames,
    observed::ObservedNames,
    resolver::ReverseDns,
    source::NameSource,
    this_host::{ThisHostNames, host_name},
};

/// The ladder, highest rung first, of the sources `options` asks for.
/// Containers and pods are asked only inside a tokio runtime (their
/// engines are polled on tasks of it).
pub fn ladder(options: &NameOptions, metrics: NameMetrics) -> Vec<Box<dyn NameSource>> {
    let mut ladder: Vec<Box<dyn NameSource>> = vec![Box::new(NameFiles::open(
        &options.hosts_files,
        &options.ethers_files,
        &options.lease_files,
    ))];
    if let Some(sockets) = &options.container_sockets {
        ladder.push(Box::new(ContainerNames::spawn(sockets.clone())));
    }
    if let Some(kubernetes) = &options.kubernetes {
        ladder.push(Box::new(KubernetesNames::spawn(
            kubernetes.clone(),
            metrics.kubernetes,
        )));
    }
    if let Some(own) = &options.own_addresses
        && let Some(this_host) = ThisHostNames::new(host_name(), own.clone())
    {
        ladder.push(Box::new(this_host));
    }
    let mut observed = ObservedNames::new(options.answer_min_ttl);
    if options.handshake_names {
        observed.wait_for_handshakes(options.wait);
    }
    ladder.push(Box::new(observed));
    if let Some(reverse_dns) = ReverseDns::start(options, metrics.lookups) {
        ladder.push(Box::new(reverse_dns));
    }
    ladder
}
