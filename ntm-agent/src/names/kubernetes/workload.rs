//! A pod's workload, from the labels kubelet copies onto its sandbox, with
//! no apiserver: the controllers' own naming rules, undone exactly.
//!
//! - Deployment: a ReplicaSet `<deployment>-<pod-template-hash>` makes pods
//!   `<replicaset>-<suffix>`; the `pod-template-hash` label says exactly
//!   what to strip (never "the last dash": deployment names have dashes).
//! - StatefulSet: pods `<statefulset>-<ordinal>`, with the
//!   `statefulset.kubernetes.io/pod-name` label.
//! - DaemonSet: pods `<daemonset>-<suffix>` with `controller-revision-hash`
//!   and `pod-template-generation` (a StatefulSet's pods carry the first
//!   too, so it is asked after the StatefulSet).
//! - Job: the `batch.kubernetes.io/job-name` (or older `job-name`) label; a
//!   CronJob names its jobs `<cronjob>-<scheduled minute>`, all digits.
//! - Anything else (a bare pod, a static pod, an unknown controller) is
//!   its own workload.

/// What runs a pod: the `workload_kind` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WorkloadKind {
    Deployment,
    StatefulSet,
    DaemonSet,
    Job,
    CronJob,
    /// No controller ntm can name: the pod is its own workload.
    Pod,
}

impl WorkloadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
            WorkloadKind::Job => "Job",
            WorkloadKind::CronJob => "CronJob",
            WorkloadKind::Pod => "Pod",
        }
    }
}

/// A pod's workload: its name and kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Workload {
    pub name: String,
    pub kind: WorkloadKind,
}

const POD_TEMPLATE_HASH: &str = "pod-template-hash";
const STATEFULSET_POD_NAME: &str = "statefulset.kubernetes.io/pod-name";
const CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";
const POD_TEMPLATE_GENERATION: &str = "pod-template-generation";
const JOB_NAME: &str = "batch.kubernetes.io/job-name";
const JOB_NAME_LEGACY: &str = "job-name";

/// Digits a CronJob's job suffix has at least: the scheduled time in
/// minutes since 1970 (8 digits from 1970-03 to 2160), so that a Job
/// someone named `backup-2` is not taken for a CronJob's.
const MIN_CRONJOB_SUFFIX_DIGITS: usize = 8;

/// The workload of pod `pod`, whose sandbox carries `label` (a lookup in
/// its labels).
pub fn workload<'a>(pod: &str, label: impl Fn(&str) -> Option<&'a str>) -> Workload {
    let own = || Workload {
        name: pod.to_string(),
        kind: WorkloadKind::Pod,
    };
    let named = |name: &str, kind| Workload {
        name: name.to_string(),
        kind,
    };
    if let Some(hash) = label(POD_TEMPLATE_HASH).filter(|h| !h.is_empty()) {
        // <deployment>-<hash>-<suffix>
        let marker = format!("-{hash}-");
        return match pod.rfind(&marker) {
            Some(at) if at > 0 && at + marker.len() < pod.len() => {
                named(&pod[..at], WorkloadKind::Deployment)
            }
            _ => own(),
        };
    }
    if label(STATEFULSET_POD_NAME) == Some(pod) {
        return match strip_suffix(pod, |s| s.bytes().all(|b| b.is_ascii_digit())) {
            Some(set) => named(set, WorkloadKind::StatefulSet),
            None => own(),
        };
    }
    if label(CONTROLLER_REVISION_HASH).is_some() && label(POD_TEMPLATE_GENERATION).is_some() {
        // <daemonset>-<generated suffix>
        return match strip_suffix(pod, |s| s.bytes().all(|b| b.is_ascii_alphanumeric())) {
            Some(set) => named(set, WorkloadKind::DaemonSet),
            None => own(),
        };
    }
    if let Some(job) = label(JOB_NAME)
        .or_else(|| label(JOB_NAME_LEGACY))
        .filter(|j| !j.is_empty())
    {
        let scheduled =
            |s: &str| s.len() >= MIN_CRONJOB_SUFFIX_DIGITS && s.bytes().all(|b| b.is_ascii_digit());
        return match strip_suffix(job, scheduled) {
            Some(cronjob) => named(cronjob, WorkloadKind::CronJob),
            None => named(job, WorkloadKind::Job),
        };
    }
    own()
}

/// `name` without its last `-<suffix>`, if the suffix is not empty and
/// passes `is_suffix`, and something is left before it.
fn strip_suffix(name: &str, is_suffix: impl Fn(&str) -> bool) -> Option<&str> {
    let (head, suffix) = name.rsplit_once('-')?;
    (!head.is_empty() && !suffix.is_empty() && is_suffix(suffix)).then_some(head)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn of(pod: &str, labels: &[(&str, &str)]) -> (String, WorkloadKind) {
        let w = workload(pod, |key| {
            labels.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
        });
        (w.name, w.kind)
    }

    #[test]
    fn a_deployments_pod_strips_exactly_its_template_hash() {
        assert_eq!(
            of(
                "web-frontend-7d4b9c8f6d-x2x9q",
                &[("app", "web"), ("pod-template-hash", "7d4b9c8f6d")]
            ),
            ("web-frontend".into(), WorkloadKind::Deployment)
        );
        // A name whose last dash is part of the deployment's own name.
        assert_eq!(
            of("api-v2-5f6c7-abcde", &[("pod-template-hash", "5f6c7")]),
            ("api-v2".into(), WorkloadKind::Deployment)
        );
        // A hash that is not in the name: the pod is its own workload.
        assert_eq!(
            of("renamed-pod", &[("pod-template-hash", "5f6c7")]),
            ("renamed-pod".into(), WorkloadKind::Pod)
        );
    }

    #[test]
    fn a_statefulsets_pod_strips_its_ordinal() {
        let labels = [
            ("statefulset.kubernetes.io/pod-name", "db-main-12"),
            ("controller-revision-hash", "db-main-6b8f"),
        ];
        assert_eq!(
            of("db-main-12", &labels),
            ("db-main".into(), WorkloadKind::StatefulSet)
        );
    }

    #[test]
    fn a_daemonsets_pod_strips_its_generated_suffix() {
        let labels = [
            ("controller-revision-hash", "6c9d8f7b5"),
            ("pod-template-generation", "3"),
        ];
        assert_eq!(
            of("node-exporter-8kx2p", &labels),
            ("node-exporter".into(), WorkloadKind::DaemonSet)
        );
    }

    #[test]
    fn jobs_and_the_jobs_of_a_cronjob() {
        assert_eq!(
            of(
                "nightly-backup-29481120-q7k2m",
                &[("batch.kubernetes.io/job-name", "nightly-backup-29481120")]
            ),
            ("nightly-backup".into(), WorkloadKind::CronJob)
        );
        assert_eq!(
            of("migrate-2-abcde", &[("job-name", "migrate-2")]),
            ("migrate-2".into(), WorkloadKind::Job)
        );
    }

    #[test]
    fn a_bare_pod_is_its_own_workload() {
        assert_eq!(
            of("debug-shell", &[("run", "debug-shell")]),
            ("debug-shell".into(), WorkloadKind::Pod)
        );
    }

    proptest! {
        /// Whatever a runtime's labels say, the workload is a non-empty
        /// part of the pod's or the job's name, and nothing panics.
        #[test]
        fn any_labels_give_a_part_of_a_name(
            pod in "[a-z0-9-]{1,40}",
            hash in "[a-z0-9-]{0,12}",
            job in "[a-z0-9-]{0,30}",
            which in 0u8..4,
        ) {
            let labels: Vec<(&str, &str)> = match which {
                0 => vec![("pod-template-hash", &hash)],
                1 => vec![("statefulset.kubernetes.io/pod-name", &pod)],
                2 => vec![("controller-revision-hash", &hash), ("pod-template-generation", "1")],
                _ => vec![("job-name", &job)],
            };
            let (name, _) = of(&pod, &labels);
            prop_assert!(!name.is_empty());
            prop_assert!(pod.contains(&name) || job.contains(&name));
        }
    }
}
