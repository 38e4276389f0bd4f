"""Lints and renders helm/ntm with default and non-default values, and
validates every rendered manifest against the Kubernetes API schemas.

Run by ntm-agent/tests/integration/helm.rs with the Python environment that
`cargo xtask test` prepares (helm-python-sdk embeds Helm 4, no binary or
network needed; kubernetes-validate carries the schemas).
Prints one line per check and "N passed, N failed" last; exits non-zero on
any failure."""

import json
import os
import sys

import helm_python as helm
import kubernetes_validate
import yaml

CHART = os.path.join(os.path.dirname(__file__), "..", "ntm")
DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "..", "grafana", "ntm.json")
KUBE_VERSION = kubernetes_validate.latest_version()

NON_DEFAULT = {
    "interfaces": ["eth0", "veth*"],
    "localNets": ["10.0.0.0/8", "fd00::/8"],
    "labels": ["src", "dst", "service"],
    "maxSeries": 5000,
    "resolveNames": False,
    "port": 9100,
    "metricPrefix": "home",
    "extraArgs": ["--drain-interval", "2s"],
    "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    "dashboard": {"enabled": True, "labels": {"grafana_dashboard": "1"}},
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [{"operator": "Exists"}],
    "priorityClassName": "system-node-critical",
    "user": "",
    "seccompProfile": {"type": "Unconfined"},
    "filter": "not port 22",
    "interfacePreset": "calico",
    "kubernetes": {"criSocket": "/run/crio/crio.sock", "names": "pod", "clusterDomain": "k8s.example"},
}

RULES_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "prometheus")
ALERTS = [r for g in yaml.safe_load(open(os.path.join(RULES_DIR, "ntm-rules.yml")))["groups"] for r in g["rules"]]
RECORDS = [
    r for g in yaml.safe_load(open(os.path.join(RULES_DIR, "ntm-kubernetes-rules.yml")))["groups"] for r in g["rules"]
]

passed, failed = 0, 0


def check(name, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}: {detail}")


def render(values):
    chart = helm.Chart.load(CHART)
    out = chart.render(values, name="ntm", namespace="monitoring", is_install=True)
    docs = []
    for path, text in out.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                docs.append((path, doc))
    return out, docs


def containers(docs):
    ds = [d for _, d in docs if d["kind"] == "DaemonSet"]
    return ds[0]["spec"]["template"]["spec"], ds[0]["spec"]["template"]["spec"]["containers"][0]


lint = helm.lint(CHART, strict=True)
serious = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
check("helm lint --strict", not lint.get("errors") and not serious, lint)

for label, values in [("default values", {}), ("non-default values", NON_DEFAULT)]:
    out, docs = render(values)
    for path, doc in docs:
        if doc["kind"] == "PrometheusRule":
            # A CRD as well: the rules file's groups, for this release.
            # With pod names on (both value sets), the recording rules too.
            rules = [r for g in doc["spec"]["groups"] for r in g["rules"]]
            exprs = " ".join(r["expr"] for r in rules)
            records = [r["record"] for r in rules if "record" in r]
            ok = (
                [r.get("alert") for r in rules if "alert" in r] == [r["alert"] for r in ALERTS]
                and records == [r["record"].replace("ntm_", "home_") for r in RECORDS]
                and "src_dst_workload:home_bytes:rate5m" in records
                and "home_interface_attached" in exprs
                and "home_k8s_pod_info" in exprs
                and "home_node_info" in exprs
                and "ntm_" not in exprs
                and 'job="ntm"' in exprs
                and doc["metadata"]["labels"].get("release") == "kube-prometheus"
            )
            check(
                f"{label}: {path} (PrometheusRule: the alert and recording rules, with prefix and job)",
                ok,
                (records, exprs),
            )
            continue
        if doc["kind"] == "ServiceMonitor":
            # A CRD: not in the core schemas; check its shape by hand.
            ok = doc["spec"]["endpoints"][0]["port"] == "metrics"
            check(f"{label}: {path} (ServiceMonitor shape)", ok, doc)
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            check(f"{label}: {path} valid against Kubernetes {KUBE_VERSION}", True)
        except Exception as e:  # the validator raises several error types
            check(f"{label}: {path} valid against Kubernetes {KUBE_VERSION}", False, e)
    pod, ctr = containers(docs)
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    sc = ctr["securityContext"]
    check(f"{label}: host network", pod.get("hostNetwork") is True)
    check(
        f"{label}: least privilege",
        sc.get("privileged") is False
        and sorted(sc["capabilities"]["add"])
        == (
            ["BPF", "NET_ADMIN", "PERFMON"]
            if values is NON_DEFAULT
            else ["BPF", "CHOWN", "NET_ADMIN", "PERFMON", "SETGID", "SETUID"]
        )
        and sc["capabilities"]["drop"] == ["ALL"]
        and sc.get("allowPrivilegeEscalation") is False,
        sc,
    )
    check(
        f"{label}: seccomp profile",
        sc.get("seccompProfile")
        == ({"type": "Unconfined"} if values is NON_DEFAULT else {"type": "RuntimeDefault"}),
        sc,
    )
    check(
        f"{label}: gives up root after attaching",
        env.get("NTM_USER", "").split(":")[0] == ("" if values is NON_DEFAULT else "65534"),
        env,
    )
    check(
        f"{label}: probes on /healthz",
        ctr["readinessProbe"]["httpGet"]["path"] == "/healthz",
    )
    mounts = {m["name"]: m["mountPath"] for m in ctr.get("volumeMounts", [])}
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in pod.get("volumes", [])}
    check(
        f"{label}: pinned state in the node's bpffs",
        mounts.get("bpffs") == "/sys/fs/bpf"
        and volumes.get("bpffs") == "/sys/fs/bpf"
        and env.get("NTM_NO_PIN") == "false",
        (mounts, volumes, env.get("NTM_NO_PIN")),
    )
    # Pod names: the node's runtime socket mounted read-only (a socket, never
    # created) and passed with --cri-socket; the node's name from the
    # downward API; `user` as given (ntm keeps the socket's group itself).
    socket = "/run/crio/crio.sock" if values is NON_DEFAULT else "/run/containerd/containerd.sock"
    cri_mounts = [m for m in ctr.get("volumeMounts", []) if m["name"] == "cri-socket"]
    cri_volumes = [v for v in pod.get("volumes", []) if v["name"] == "cri-socket"]
    check(
        f"{label}: the CRI socket mounted read-only from the node and passed with --cri-socket",
        cri_mounts == [{"name": "cri-socket", "mountPath": socket, "readOnly": True}]
        and cri_volumes == [{"name": "cri-socket", "hostPath": {"path": socket, "type": "Socket"}}]
        and f"--cri-socket={socket}" in ctr["args"]
        and "--no-kubernetes" not in ctr["args"],
        (cri_mounts, cri_volumes, ctr["args"]),
    )
    check(
        f"{label}: NODE_NAME from the downward API",
        [e for e in ctr["env"] if e["name"] == "NODE_NAME"]
        == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
        ctr["env"],
    )
    check(
        f"{label}: the user as given",
        env.get("NTM_USER") == (None if values is NON_DEFAULT else "65534"),
        env,
    )
    # Names need no apiserver: no ClusterRole, no token in the agent's pod;
    # the only RBAC is the uninstall hook's Role, in its own namespace.
    check(
        f"{label}: no ClusterRole, no service account token in the agent's pod",
        not any(d["kind"] in ("ClusterRole", "ClusterRoleBinding") for _, d in docs)
        and all(
            d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"
            for _, d in docs
            if d["kind"] in ("Role", "RoleBinding", "ServiceAccount")
        )
        and pod.get("automountServiceAccountToken") is False
        and "serviceAccountName" not in pod,
        [d["kind"] for _, d in docs],
    )
    check(f"{label}: NOTES.txt", "port-forward" in out["ntm/templates/NOTES.txt"])
    cms = [d for _, d in docs if d["kind"] == "ConfigMap"]
    check(
        f"{label}: dashboard ConfigMap for the sidecar, same as grafana/ntm.json",
        len(cms) == 1
        and cms[0]["metadata"]["labels"].get("grafana_dashboard") == "1"
        and json.loads(cms[0]["data"]["ntm.json"]) == json.load(open(DASHBOARD)),
    )
    if values is NON_DEFAULT:
        check(
            "non-default values reach the agent",
            env.get("NTM_LOCAL_NETS") == "10.0.0.0/8,fd00::/8"
            and env.get("NTM_NUMERIC") == "true"
            and env.get("NTM_PORT") == "9100"
            and env.get("NTM_METRIC_PREFIX") == "home"
            and env.get("NTM_FILTERS") == "not port 22"
            and env.get("NTM_K8S_NAMES") == "pod"
            and env.get("NTM_CLUSTER_DOMAIN") == "k8s.example"
            and ctr["args"] == ["--cri-socket=/run/crio/crio.sock", "--drain-interval", "2s"]
            and ctr["ports"][0]["containerPort"] == 9100,
            (env, ctr["args"]),
        )
        check(
            "non-default values: the interface preset's patterns, then the interfaces",
            env.get("NTM_INTERFACE") == "cali*,eth0,veth*",
            env,
        )
        check("ServiceMonitor rendered", any(d["kind"] == "ServiceMonitor" for _, d in docs))
    else:
        check("no ServiceMonitor by default", not any(d["kind"] == "ServiceMonitor" for _, d in docs))

_, docs = render({})
hooks = [d for _, d in docs if d["metadata"].get("annotations", {}).get("helm.sh/hook") == "pre-delete"]
job = [d for d in hooks if d["kind"] == "Job"]
script = " ".join(job[0]["spec"]["template"]["spec"]["containers"][0]["command"]) if job else ""
check(
    "uninstall: a pre-delete hook rolls NTM_DETACH_ON_STOP out before the DaemonSet goes",
    sorted(d["kind"] for d in hooks) == ["Job", "Role", "RoleBinding", "ServiceAccount"]
    and "set env daemonset/ntm NTM_DETACH_ON_STOP=true" in script
    and "rollout status daemonset/ntm" in script,
    script,
)
_, docs = render({"uninstallDetach": {"enabled": False}})
check(
    "uninstall hook can be turned off",
    not any(d["metadata"].get("annotations", {}).get("helm.sh/hook") for _, d in docs),
)

_, docs = render({"pinState": False, "stateDir": "", "tcpHealth": False})
pod, ctr = containers(docs)
env = {e["name"]: e.get("value") for e in ctr["env"]}
check(
    "pinState false, stateDir empty: no bpffs, no history on the node",
    env.get("NTM_NO_PIN") == "true"
    and env.get("NTM_NO_HISTORY") == "true"
    and [v["name"] for v in pod.get("volumes", [])] == ["cri-socket"]
    and [m["name"] for m in ctr.get("volumeMounts", [])] == ["cri-socket"],
    env,
)
_, docs = render({"pinState": False, "stateDir": "", "kubernetes": {"criSocket": ""}, "tcpHealth": False})
pod, ctr = containers(docs)
check(
    "nothing of the node's mounted when neither pinned state, history, pod names nor TCP health is wanted",
    "volumes" not in pod and "volumeMounts" not in ctr,
    pod,
)

_, docs = render({})
pod, ctr = containers(docs)
env = {e["name"]: e.get("value") for e in ctr["env"]}
mounts = {m["name"]: m["mountPath"] for m in ctr.get("volumeMounts", [])}
volumes = {v["name"]: v.get("hostPath", {}) for v in pod.get("volumes", [])}
read_only = {m["name"]: m.get("readOnly", False) for m in ctr.get("volumeMounts", [])}
check(
    "TCP health by default, without the node's tracefs (a raw tracepoint needs none)",
    env.get("NTM_NO_TCP_HEALTH") == "false"
    and not any("/sys/kernel/tracing" in str(v) for v in mounts.values())
    and not any("/sys/kernel/tracing" in str(v) for v in volumes.values()),
    (env, mounts, volumes),
)
_, docs = render({"tcpHealth": False})
pod, ctr = containers(docs)
env = {e["name"]: e.get("value") for e in ctr["env"]}
check(
    "tcpHealth false: NTM_NO_TCP_HEALTH",
    env.get("NTM_NO_TCP_HEALTH") == "true",
    env,
)
_, docs = render({})
pod, ctr = containers(docs)
env = {e["name"]: e.get("value") for e in ctr["env"]}
mounts = {m["name"]: m["mountPath"] for m in ctr.get("volumeMounts", [])}
volumes = {v["name"]: v.get("hostPath", {}) for v in pod.get("volumes", [])}
check(
    "history in the node's /var/lib/ntm by default",
    env.get("NTM_STATE_DIR") == "/var/lib/ntm"
    and mounts.get("state") == "/var/lib/ntm"
    and volumes.get("state") == {"path": "/var/lib/ntm", "type": "DirectoryOrCreate"},
    (env, mounts, volumes),
)

_, docs = render(
    {
        "webConfig": {"secretName": "ntm-web", "tls": True},
        "serviceMonitor": {
            "enabled": True,
            "basicAuth": {"username": {"name": "ntm-auth", "key": "user"}, "password": {"name": "ntm-auth", "key": "password"}},
            "tlsConfig": {"ca": {"configMap": {"name": "ntm-ca", "key": "ca.crt"}}, "serverName": "ntm"},
        },
    }
)
pod, ctr = containers(docs)
env = {e["name"]: e.get("value") for e in ctr["env"]}
mounts = {m["name"]: m["mountPath"] for m in ctr.get("volumeMounts", [])}
secrets = {v["name"]: v.get("secret", {}).get("secretName") for v in pod.get("volumes", [])}
monitor = [d for _, d in docs if d["kind"] == "ServiceMonitor"][0]["spec"]["endpoints"][0]
check(
    "webConfig: the Secret mounted and passed, HTTPS probes, the ServiceMonitor over TLS with basic auth",
    env.get("NTM_WEB_CONFIG_FILE") == "/etc/ntm/web/web-config.yml"
    and mounts.get("web-config") == "/etc/ntm/web"
    and secrets.get("web-config") == "ntm-web"
    and ctr["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    and "tcpSocket" in ctr["livenessProbe"]
    and monitor.get("scheme") == "https"
    and monitor["basicAuth"]["password"]["name"] == "ntm-auth"
    and monitor["tlsConfig"]["serverName"] == "ntm",
    (env, mounts, secrets, ctr["readinessProbe"], monitor),
)

# Pod names off: nothing mounted, --no-kubernetes, no recording rules.
out, docs = render({"kubernetes": {"criSocket": ""}, "prometheusRule": {"enabled": True}})
pod, ctr = containers(docs)
env = {e["name"]: e.get("value") for e in ctr["env"]}
rules = [r for _, d in docs if d["kind"] == "PrometheusRule" for g in d["spec"]["groups"] for r in g["rules"]]
check(
    "kubernetes.criSocket empty: no socket mounted, --no-kubernetes, alert rules only",
    ctr["args"] == ["--no-kubernetes"]
    and not any(m["name"] == "cri-socket" for m in ctr.get("volumeMounts", []))
    and not any(v["name"] == "cri-socket" for v in pod.get("volumes", []))
    and env.get("NTM_USER") == "65534"
    and "NTM_K8S_NAMES" not in env
    and [r.get("alert") for r in rules] == [r["alert"] for r in ALERTS],
    (ctr["args"], env, rules),
)
for values, user in [({"user": "1000:1000"}, "1000:1000"), ({"user": "nobody"}, "nobody"), ({"user": ""}, None)]:
    _, docs = render(values)
    _, ctr = containers(docs)
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    check(f"user {values['user']!r}: NTM_USER {user!r}", env.get("NTM_USER") == user, env)

_, docs = render({"kubernetes": {"criSocket": "/run/k3s/containerd/containerd.sock"}})
pod, ctr = containers(docs)
env = {e["name"]: e.get("value") for e in ctr["env"]}
check(
    "another runtime's socket: mounted where the node has it, passed",
    ctr["args"] == ["--cri-socket=/run/k3s/containerd/containerd.sock"]
    and {"name": "cri-socket", "mountPath": "/run/k3s/containerd/containerd.sock", "readOnly": True}
    in ctr["volumeMounts"]
    and {"name": "cri-socket", "hostPath": {"path": "/run/k3s/containerd/containerd.sock", "type": "Socket"}}
    in pod["volumes"]
    and env.get("NTM_USER") == "65534",
    (ctr, pod.get("volumes")),
)

# The CNIs' interface presets: their patterns, besides the interfaces; by
# default neither (the default-route interface).
expected = {"veth": "veth*", "calico": "cali*", "cilium": "lxc*", "bridge": "cni0", "flannel": "flannel.1"}
presets = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))["interfacePresets"]
check("interface presets for the common CNIs", {k: ",".join(v) for k, v in presets.items()} == expected, presets)
for preset, patterns in expected.items():
    _, docs = render({"interfacePreset": preset})
    _, ctr = containers(docs)
    env = {e["name"]: e.get("value") for e in ctr["env"]}
    check(f"interfacePreset {preset}: NTM_INTERFACE {patterns}", env.get("NTM_INTERFACE") == patterns, env)
_, docs = render({})
_, ctr = containers(docs)
check(
    "by default no NTM_INTERFACE: the default-route interface, as before",
    not any(e["name"] == "NTM_INTERFACE" for e in ctr["env"]),
    ctr["env"],
)
try:
    render({"interfacePreset": "weave"})
    check("an unknown interfacePreset fails with the presets named", False, "rendered")
except Exception as e:
    check(
        "an unknown interfacePreset fails with the presets named",
        "bridge, calico, cilium, flannel, veth" in str(e),
        e,
    )

_, docs = render({"privileged": True})
_, ctr = containers(docs)
check("privileged only as an opt-in", ctr["securityContext"] == {"privileged": True})

print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
