//! ntm's integration tests: one test binary (as aya lays out its own), one
//! module per feature, one kit they share (`kit`), and one gate for the
//! tests that need root (see [`kit::root_tests_enabled`]).
//!
//! Run with `cargo xtask test` (as root for the kernel tests); arguments
//! after `--` filter by name as with any cargo test, e.g.
//! `cargo xtask test -- traffic::`.

mod kit;

mod api;
mod bridge;
mod configuration;
mod dashboard;
mod deploy;
mod endpoint;
mod filter_traffic;
mod filters;
mod frames;
mod golden;
mod health;
mod hello;
mod helm;
mod history;
mod home;
mod image;
mod ipfix;
mod kubernetes;
mod links;
mod listing;
mod names;
mod observed;
mod page;
mod privileges;
mod prometheus;
mod restart;
mod traffic;
mod web;

use kit::Needs;
use libtest_mimic::{Arguments, Trial};

/// `Needs: module::test, ...` as (needs, "module::test", test).
macro_rules! tests {
    ($($needs:ident: $module:ident :: $test:ident),* $(,)?) => {
        &[$((Needs::$needs, concat!(stringify!($module), "::", stringify!($test)), $module::$test)),*]
    };
}

/// Every test, with what it needs.
const TESTS: &[(Needs, &str, fn())] = tests![
    Root: api::the_api_shows_devices_servers_services_and_interfaces_exactly,
    Root: page::the_page_shows_what_was_sent_and_names_as_text,
    Root: web::prometheus_scrapes_over_tls_with_a_client_certificate_and_basic_auth,
    Root: web::a_bad_web_config_fails_at_start_with_nothing_attached,
    Root: history::totals_survive_a_restart_and_a_kill_9,
    Root: history::a_damaged_newer_or_read_only_database_keeps_counting,
    Root: history::period_totals_and_a_quota_equal_what_was_sent,
    Root: history::period_totals_and_a_quota_from_the_first_scrape_after_a_restart,
    Root: ipfix::every_flow_reaches_nfdump_and_pmacct_exactly,
    Root: ipfix::a_collector_that_comes_late_gets_everything_after,
    Root: ipfix::counts_outside_the_flow_table_reach_the_collector,
    Root: ipfix::a_flow_above_4_gib_in_one_interval_is_exact,
    Root: ipfix::a_collector_killed_and_started_again_gets_every_record_after,
    Root: home::a_home_network_is_right_without_configuration,
    Root: home::given_local_networks_are_exactly_those,
    Root: bridge::every_frame_crossing_a_bridge_is_counted_once,
    Root: bridge::interfaces_absent_at_start_and_recreated_are_followed,
    Nothing: configuration::every_flag_is_documented_and_every_documented_flag_exists,
    Nothing: dashboard::dashboard_structure,
    Root: dashboard::every_panel_query_returns_data_from_a_real_prometheus,
    Nothing: deploy::systemd_unit_verifies,
    Root: deploy::an_unprivileged_agent_with_the_units_capabilities_counts,
    Root: deploy::alert_rules_pass_promtool_and_name_real_metrics,
    Root: endpoint::interface_attached_says_how_each_interface_is_hooked,
    Root: endpoint::user_errors_are_one_line_without_a_backtrace,
    Root: endpoint::no_client_can_flood_the_log_or_hold_a_connection,
    Root: filter_traffic::only_matching_traffic_is_counted_and_the_rest_is_filtered_exactly,
    Root: filter_traffic::sighup_swaps_the_filter_from_its_file_without_losing_a_packet,
    Root: filter_traffic::vlan_tags_in_skb_metadata_look_to_the_filter_as_they_do_to_tcpdump,
    Root: filter_traffic::bad_filters_fail_before_anything_is_attached,
    Root: filters::kernel_verdicts_equal_libpcaps_on_raw_ip_frames,
    Root: filters::a_long_filter_loads_and_agrees_with_libpcap,
    Root: frames::ipv4_udp_to_a_known_port_in_both_directions,
    Root: frames::repeated_frames_are_counted_exactly,
    Root: frames::the_steady_state_counts_only_frames_that_need_no_decision,
    Root: frames::a_syn_flood_cannot_grow_the_handshake_table,
    Root: frames::a_handshake_holds_its_gate_open_until_its_client_acks,
    Root: frames::single_and_double_vlan_tags_in_the_frame,
    Root: frames::ipv4_options_and_fragments,
    Root: frames::common_frames_and_the_full_parse_give_one_key,
    Root: frames::ipv6_extension_header_chains,
    Root: frames::icmp_and_icmpv6_message_types,
    Root: frames::non_ip_frames_are_counted_by_ethertype,
    Root: frames::malformed_frames_are_counted_by_reason_not_lost,
    Root: frames::ethernet_padding_is_not_counted,
    Root: frames::gso_aggregates_count_as_their_wire_segments,
    Root: frames::service_port_rule_runs_in_the_kernel,
    Root: frames::a_full_table_still_counts_every_packet,
    Root: frames::a_full_table_does_not_keep_a_flow_cache_that_does_not_pay,
    Root: frames::the_flow_cache_steps_aside_while_nearly_every_frame_misses_it,
    Root: frames::a_drained_table_keeps_the_flows_that_sent_and_drops_the_rest,
    Root: frames::sctp_udplite_and_portless_protocols,
    Root: frames::hostile_dns_and_dhcp_frames_are_counted_and_handed_over,
    Root: frames::client_hellos_and_quic_initials_are_handed_over_by_their_first_bytes,
    Root: frames::a_client_hello_over_several_segments_is_followed_to_its_end,
    Root: frames::half_client_hellos_cannot_grow_the_kernel_state_nor_starve_dns,
    Root: frames::source_macs_are_learnt_when_a_flow_takes_a_cache_slot,
    Root: golden::the_exposition_equals_the_golden_file,
    Nothing: helm::chart_lints_renders_and_validates,
    Nothing: hello::real_tls_clients_name_their_server_from_any_segments,
    Nothing: hello::real_quic_initials_name_their_server_split_and_reordered,
    Root: image::the_image_runs_with_least_privilege_and_counts,
    Root: kubernetes::the_fixture_runs_pods_like_kubelet,
    Root: health::the_delay_line_delays_each_way_and_drops_what_it_is_told,
    Root: health::every_retransmission_of_a_connection_is_counted,
    Root: health::retransmissions_reach_metrics_by_client_server_and_service,
    Root: health::handshakes_are_split_at_the_router_and_failures_counted_tcx,
    Root: health::handshakes_are_split_at_the_router_and_failures_counted_clsact,
    Root: health::handshakes_are_split_at_the_router_and_failures_counted_xdp,
    Root: health::handshakes_reach_metrics_by_side_and_reason,
    Root: kubernetes::pods_are_named_by_workload_and_counted_exactly,
    Nothing: listing::every_integration_test_is_listed,
    Root: links::tun_device_frames_start_at_the_ip_header,
    Root: links::vlan_tags_moved_into_skb_metadata_are_still_seen,
    Root: names::devices_by_hosts_files_and_dhcp_leases,
    Root: names::names_from_a_real_dns_exchange_without_splitting_series,
    Root: names::containers_by_the_names_their_engine_gives,
    Root: observed::servers_by_the_name_their_client_asked,
    Root: observed::devices_by_the_host_name_their_dhcp_client_sent,
    Root: observed::servers_by_the_name_their_client_sent_in_its_handshake,
    Root: privileges::after_attaching_it_runs_as_nobody_with_three_capabilities_and_still_works,
    Root: privileges::an_unknown_user_fails_before_anything_is_attached,
    Root: prometheus::prometheus_sees_exactly_what_was_sent,
    Root: prometheus::endpoint_errors_and_flag_precedence,
    Root: prometheus::exposition_labels_for_every_kind_of_traffic,
    Root: prometheus::series_budget_with_real_traffic_still_adds_up,
    Root: prometheus::idle_series_expire_from_the_endpoint,
    Root: restart::another_layout_is_drained_and_replaced_and_a_full_table_counts_while_no_agent_runs,
    Root: restart::past_the_orphan_timeout_the_programs_stop_counting,
    Root: restart::detach_on_stop_leaves_nothing_after_sigterm,
    Root: traffic::udp_icmp_tcp_over_ipv4_and_ipv6_counted_exactly,
    Root: traffic::draining_every_few_milliseconds_loses_nothing,
    Root: traffic::offloads_do_not_change_the_numbers,
    Root: traffic::restart_after_kill_never_stacks_a_second_copy,
    Root: traffic::clear_errors_for_bad_input,
    Root: traffic::clsact_mode_counts_exactly_and_replaces_stale_filters,
    Root: traffic::a_full_flow_table_still_adds_up,
    Root: traffic::a_full_flow_table_adds_up_per_interface,
    Root: traffic::fragmented_datagrams_stay_in_one_series,
    Root: traffic::coverage_equals_the_interface_counters,
    Root: traffic::loopback_counts_each_packet_once,
    Root: traffic::xdp_mode_counts_then_passes_or_drops,
    Root: traffic::other_tc_programs_keep_running_and_their_verdicts_stand,
];

/// `Needs: module::test[case, ...]` as (needs, "module::test", cases, test).
macro_rules! cases {
    ($($needs:ident: $module:ident :: $test:ident [$($case:ident),+ $(,)?]),* $(,)?) => {
        &[$((
            Needs::$needs,
            concat!(stringify!($module), "::", stringify!($test)),
            &[$(stringify!($case)),+],
            $module::$test,
        )),*]
    };
}

/// A test run over cases: (needs, "module::test", cases, test).
type Cases = (Needs, &'static str, &'static [&'static str], fn(&str));

/// Every test that one body runs over a table of cases, with what it
/// needs: each case is a test of its own, named `module::test_case`.
const CASES: &[Cases] = cases![
    Root: filters::kernel_verdicts_equal_libpcaps_on_ethernet_frames[at_tc, at_xdp],
    Root: restart::counted_equals_sent_across_kill_and_sigterm_then_detach_leaves_nothing[tcx, clsact, xdp],
];

/// A test that takes longer than this says so: CI's budget is 30 minutes,
/// and the slow tests are where its test step's time goes.
const SLOW: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs `test`, and says how long it took if that was more than [`SLOW`].
fn timed(name: &str, test: impl FnOnce()) {
    let started = std::time::Instant::now();
    test();
    let took = started.elapsed();
    if took > SLOW {
        eprintln!("slow test: {name} took {:.1} s", took.as_secs_f64());
    }
}

fn main() -> std::process::ExitCode {
    let arguments = Arguments::from_args();
    let root = match kit::root_tests_enabled() {
        Ok(root) => root,
        Err(message) => {
            eprintln!("{message}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let ignored = |needs| needs == Needs::Root && !root;
    let single = TESTS.iter().map(|&(needs, name, test)| {
        Trial::test(name, move || {
            timed(name, test);
            Ok(())
        })
        .with_ignored_flag(ignored(needs))
    });
    let cases = CASES.iter().flat_map(|&(needs, name, cases, test)| {
        cases.iter().map(move |&case| {
            let name = format!("{name}_{case}");
            Trial::test(name.clone(), move || {
                timed(&name, || test(case));
                Ok(())
            })
            .with_ignored_flag(ignored(needs))
        })
    });
    let trials = single.chain(cases).collect();
    libtest_mimic::run(&arguments, trials).exit_code()
}
