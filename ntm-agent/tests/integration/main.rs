//! ntm's integration tests: one test binary (as aya lays out its own), one
//! module per feature, one kit they share (`kit`), and one gate for the
//! tests that need root (see [`kit::root_tests_enabled`]).
//!
//! Run with `cargo xtask test` (as root for the kernel tests); arguments
//! after `--` filter by name as with any cargo test, e.g.
//! `cargo xtask test -- traffic::`.

mod kit;

mod bridge;
mod dashboard;
mod deploy;
mod filter_traffic;
mod filters;
mod frames;
mod helm;
mod image;
mod links;
mod names;
mod privileges;
mod prometheus;
mod traffic;

use kit::Needs;
use libtest_mimic::{Arguments, Trial};

/// Every test, with what it needs.
const TESTS: &[(Needs, &str, fn())] = &[
    (
        Needs::Root,
        "bridge::every_frame_crossing_a_bridge_is_counted_once",
        bridge::every_frame_crossing_a_bridge_is_counted_once,
    ),
    (
        Needs::Root,
        "bridge::interfaces_absent_at_start_and_recreated_are_followed",
        bridge::interfaces_absent_at_start_and_recreated_are_followed,
    ),
    (
        Needs::Nothing,
        "dashboard::dashboard_structure",
        dashboard::dashboard_structure,
    ),
    (
        Needs::Root,
        "dashboard::every_panel_query_returns_data_from_a_real_prometheus",
        dashboard::every_panel_query_returns_data_from_a_real_prometheus,
    ),
    (
        Needs::Nothing,
        "deploy::systemd_unit_verifies",
        deploy::systemd_unit_verifies,
    ),
    (
        Needs::Root,
        "deploy::an_unprivileged_agent_with_the_units_capabilities_counts",
        deploy::an_unprivileged_agent_with_the_units_capabilities_counts,
    ),
    (
        Needs::Root,
        "filter_traffic::only_matching_traffic_is_counted_and_the_rest_is_filtered_exactly",
        filter_traffic::only_matching_traffic_is_counted_and_the_rest_is_filtered_exactly,
    ),
    (
        Needs::Root,
        "filter_traffic::sighup_swaps_the_filter_from_its_file_without_losing_a_packet",
        filter_traffic::sighup_swaps_the_filter_from_its_file_without_losing_a_packet,
    ),
    (
        Needs::Root,
        "filter_traffic::vlan_tags_in_skb_metadata_look_to_the_filter_as_they_do_to_tcpdump",
        filter_traffic::vlan_tags_in_skb_metadata_look_to_the_filter_as_they_do_to_tcpdump,
    ),
    (
        Needs::Root,
        "filter_traffic::bad_filters_fail_before_anything_is_attached",
        filter_traffic::bad_filters_fail_before_anything_is_attached,
    ),
    (
        Needs::Root,
        "filters::kernel_verdicts_equal_libpcaps_on_ethernet_frames_at_tc",
        filters::kernel_verdicts_equal_libpcaps_on_ethernet_frames_at_tc,
    ),
    (
        Needs::Root,
        "filters::kernel_verdicts_equal_libpcaps_on_ethernet_frames_at_xdp",
        filters::kernel_verdicts_equal_libpcaps_on_ethernet_frames_at_xdp,
    ),
    (
        Needs::Root,
        "filters::kernel_verdicts_equal_libpcaps_on_raw_ip_frames",
        filters::kernel_verdicts_equal_libpcaps_on_raw_ip_frames,
    ),
    (
        Needs::Root,
        "filters::a_long_filter_loads_and_agrees_with_libpcap",
        filters::a_long_filter_loads_and_agrees_with_libpcap,
    ),
    (
        Needs::Root,
        "frames::ipv4_udp_to_a_known_port_in_both_directions",
        frames::ipv4_udp_to_a_known_port_in_both_directions,
    ),
    (
        Needs::Root,
        "frames::repeated_frames_are_counted_exactly",
        frames::repeated_frames_are_counted_exactly,
    ),
    (
        Needs::Root,
        "frames::single_and_double_vlan_tags_in_the_frame",
        frames::single_and_double_vlan_tags_in_the_frame,
    ),
    (
        Needs::Root,
        "frames::ipv4_options_and_fragments",
        frames::ipv4_options_and_fragments,
    ),
    (
        Needs::Root,
        "frames::ipv6_extension_header_chains",
        frames::ipv6_extension_header_chains,
    ),
    (
        Needs::Root,
        "frames::icmp_and_icmpv6_message_types",
        frames::icmp_and_icmpv6_message_types,
    ),
    (
        Needs::Root,
        "frames::non_ip_frames_are_counted_by_ethertype",
        frames::non_ip_frames_are_counted_by_ethertype,
    ),
    (
        Needs::Root,
        "frames::malformed_frames_are_counted_by_reason_not_lost",
        frames::malformed_frames_are_counted_by_reason_not_lost,
    ),
    (
        Needs::Root,
        "frames::ethernet_padding_is_not_counted",
        frames::ethernet_padding_is_not_counted,
    ),
    (
        Needs::Root,
        "frames::gso_aggregates_count_as_their_wire_segments",
        frames::gso_aggregates_count_as_their_wire_segments,
    ),
    (
        Needs::Root,
        "frames::service_port_rule_runs_in_the_kernel",
        frames::service_port_rule_runs_in_the_kernel,
    ),
    (
        Needs::Root,
        "frames::a_full_table_still_counts_every_packet",
        frames::a_full_table_still_counts_every_packet,
    ),
    (
        Needs::Root,
        "frames::sctp_udplite_and_portless_protocols",
        frames::sctp_udplite_and_portless_protocols,
    ),
    (
        Needs::Nothing,
        "helm::chart_lints_renders_and_validates",
        helm::chart_lints_renders_and_validates,
    ),
    (
        Needs::Root,
        "image::the_image_runs_with_least_privilege_and_counts",
        image::the_image_runs_with_least_privilege_and_counts,
    ),
    (
        Needs::Root,
        "links::tun_device_frames_start_at_the_ip_header",
        links::tun_device_frames_start_at_the_ip_header,
    ),
    (
        Needs::Root,
        "links::vlan_tags_moved_into_skb_metadata_are_still_seen",
        links::vlan_tags_moved_into_skb_metadata_are_still_seen,
    ),
    (
        Needs::Root,
        "names::names_from_a_real_dns_exchange_without_splitting_series",
        names::names_from_a_real_dns_exchange_without_splitting_series,
    ),
    (
        Needs::Root,
        "privileges::after_attaching_it_runs_as_nobody_with_three_capabilities_and_still_works",
        privileges::after_attaching_it_runs_as_nobody_with_three_capabilities_and_still_works,
    ),
    (
        Needs::Root,
        "privileges::an_unknown_user_fails_before_anything_is_attached",
        privileges::an_unknown_user_fails_before_anything_is_attached,
    ),
    (
        Needs::Root,
        "prometheus::prometheus_sees_exactly_what_was_sent",
        prometheus::prometheus_sees_exactly_what_was_sent,
    ),
    (
        Needs::Root,
        "prometheus::endpoint_errors_and_flag_precedence",
        prometheus::endpoint_errors_and_flag_precedence,
    ),
    (
        Needs::Root,
        "prometheus::exposition_labels_for_every_kind_of_traffic",
        prometheus::exposition_labels_for_every_kind_of_traffic,
    ),
    (
        Needs::Root,
        "prometheus::series_budget_with_real_traffic_still_adds_up",
        prometheus::series_budget_with_real_traffic_still_adds_up,
    ),
    (
        Needs::Root,
        "prometheus::idle_series_expire_from_the_endpoint",
        prometheus::idle_series_expire_from_the_endpoint,
    ),
    (
        Needs::Root,
        "traffic::udp_icmp_tcp_over_ipv4_and_ipv6_counted_exactly",
        traffic::udp_icmp_tcp_over_ipv4_and_ipv6_counted_exactly,
    ),
    (
        Needs::Root,
        "traffic::draining_every_few_milliseconds_loses_nothing",
        traffic::draining_every_few_milliseconds_loses_nothing,
    ),
    (
        Needs::Root,
        "traffic::offloads_do_not_change_the_numbers",
        traffic::offloads_do_not_change_the_numbers,
    ),
    (
        Needs::Root,
        "traffic::restart_after_kill_never_stacks_a_second_copy",
        traffic::restart_after_kill_never_stacks_a_second_copy,
    ),
    (
        Needs::Root,
        "traffic::clear_errors_for_bad_input",
        traffic::clear_errors_for_bad_input,
    ),
    (
        Needs::Root,
        "traffic::clsact_mode_counts_exactly_and_replaces_stale_filters",
        traffic::clsact_mode_counts_exactly_and_replaces_stale_filters,
    ),
    (
        Needs::Root,
        "traffic::a_full_flow_table_still_adds_up",
        traffic::a_full_flow_table_still_adds_up,
    ),
    (
        Needs::Root,
        "traffic::xdp_mode_counts_then_passes_or_drops",
        traffic::xdp_mode_counts_then_passes_or_drops,
    ),
    (
        Needs::Root,
        "traffic::other_tc_programs_keep_running_and_their_verdicts_stand",
        traffic::other_tc_programs_keep_running_and_their_verdicts_stand,
    ),
];

fn main() -> std::process::ExitCode {
    let arguments = Arguments::from_args();
    let root = match kit::root_tests_enabled() {
        Ok(root) => root,
        Err(message) => {
            eprintln!("{message}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let trials = TESTS
        .iter()
        .map(|&(needs, name, test)| {
            Trial::test(name, move || {
                test();
                Ok(())
            })
            .with_ignored_flag(needs == Needs::Root && !root)
        })
        .collect();
    libtest_mimic::run(&arguments, trials).exit_code()
}
