//! The files in docker/ cannot run on this machine (no container runtime in CI), so they are
//! read and checked against the code: every embedded configuration loads and validates, and
//! ports, probe paths, config paths, users and names agree across the Dockerfile, compose
//! and the Kubernetes manifests.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use patroxy::config::Config;
use patroxy::policy::ListenerRole;
use serde_json::Value;

fn docker(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("docker")
        .join(file)
}

/// Every document of a YAML file, as JSON: Debian's PyYAML (Patroni's own dependency) reads it.
fn yaml(file: &str) -> Vec<Value> {
    py_yaml("open(sys.argv[1])", &docker(file).to_string_lossy())
}

/// A YAML value written inline (a PATRONI_* variable's, as Patroni parses it).
fn yaml_value(text: &str) -> Value {
    py_yaml("sys.argv[1]", text).remove(0)
}

/// The documents PyYAML reads from `source` (Python, with `arg` as sys.argv[1]).
fn py_yaml(source: &str, arg: &str) -> Vec<Value> {
    let script = format!(
        "import sys, json, yaml\n\
         docs = [d for d in yaml.safe_load_all({source}) if d is not None]\n\
         print(json.dumps(docs))"
    );
    let out = Command::new("/usr/bin/python3")
        .args(["-c", &script])
        .arg(arg)
        .output()
        .expect("Debian's python3 with python3-yaml (scripts/install-deps.sh installs both)");
    assert!(
        out.status.success(),
        "{arg}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn config(name: &str, text: &str) -> Config {
    let c = Config::from_toml(Path::new(name), text).unwrap();
    c.validate().unwrap_or_else(|e| panic!("{name}: {e}"));
    c
}

fn port(addr: &str) -> u16 {
    addr.rsplit_once(':').unwrap().1.parse().unwrap()
}

/// The ports a configuration listens on: listeners, then the admin endpoint.
fn ports(c: &Config) -> (Vec<u16>, u16) {
    let listeners = c.listeners.iter().map(|l| port(&l.listen)).collect();
    (
        listeners,
        port(c.admin.listen.as_deref().expect("an admin endpoint")),
    )
}

fn listener_port(c: &Config, role: ListenerRole) -> u16 {
    port(&c.listeners.iter().find(|l| l.role == role).unwrap().listen)
}

/// The Dockerfile's final stage: what it exposes, its user, its config path.
struct Image {
    exposed: BTreeSet<u16>,
    user: String,
    config_path: String,
}

fn image() -> Image {
    let text = std::fs::read_to_string(docker("Dockerfile")).unwrap();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
    let stages = lines.iter().filter(|l| l.starts_with("FROM ")).count();
    assert!(stages >= 2, "a multi-stage build");
    assert!(text.contains("protobuf-compiler"), "protoc for etcd-client");
    assert!(
        text.contains("libclang-dev"),
        "libclang for pg_query's bindings"
    );
    assert!(text.contains("cargo build --release --locked"));
    let last = lines.iter().rposition(|l| l.starts_with("FROM ")).unwrap();
    let runtime = &lines[last..];
    let value = |key: &str| {
        runtime
            .iter()
            .filter_map(|l| l.strip_prefix(key))
            .next_back()
            .unwrap_or_else(|| panic!("no {key} in the runtime stage"))
            .trim()
            .to_owned()
    };
    let cmd: Vec<String> = serde_json::from_str(&value("CMD ")).unwrap();
    let at = cmd.iter().position(|a| a == "--config").unwrap();
    Image {
        exposed: value("EXPOSE ")
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect(),
        user: value("USER "),
        config_path: cmd[at + 1].clone(),
    }
}

#[test]
fn the_image_and_compose_agree_with_the_code() {
    let img = image();
    assert_ne!(img.user, "root");
    assert_ne!(img.user, "0");
    let text = std::fs::read_to_string(docker("patroxy.toml")).unwrap();
    let cfg = config("docker/patroxy.toml", &text);
    let (listeners, admin) = ports(&cfg);
    let mut all: BTreeSet<u16> = listeners.iter().copied().collect();
    all.insert(admin);
    assert_eq!(img.exposed, all, "EXPOSE and docker/patroxy.toml");
    // The demo's ports, the same everywhere.
    assert_eq!(listener_port(&cfg, ListenerRole::Primary), 6432);
    assert_eq!(listener_port(&cfg, ListenerRole::Replica), 6433);
    let dockerfile = std::fs::read_to_string(docker("Dockerfile")).unwrap();
    assert!(dockerfile.contains(&format!("COPY docker/patroxy.toml {}", img.config_path)));

    let compose = &yaml("compose.yml")[0];
    let services = compose["services"].as_object().unwrap();
    for s in ["etcd", "patroni1", "patroni2", "patroni3", "patroxy"] {
        assert!(services.contains_key(s), "compose service {s}");
    }
    let patroxy = &services["patroxy"];
    let published: BTreeSet<String> = patroxy["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_owned())
        .collect();
    let expected: BTreeSet<String> = all.iter().map(|p| format!("127.0.0.1:{p}:{p}")).collect();
    assert_eq!(
        published, expected,
        "ports published on the host's loopback only"
    );
    let mounts: Vec<&str> = patroxy["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(mounts.contains(&&*format!("./patroxy.toml:{}:ro", img.config_path)));
    // patroxy's etcd endpoint is the etcd service, and Patroni uses the same one.
    let endpoint = cfg.etcd.endpoints[0].trim_start_matches("http://");
    let etcd_args = services["etcd"]["command"].to_string();
    assert!(etcd_args.contains(&format!("--advertise-client-urls=http://{endpoint}")));
    let patroni = &yaml("patroni/patroni.yml")[0];
    for dcs in DCS_SECTIONS {
        assert!(
            patroni[dcs].is_null(),
            "patroni.yml names no DCS ({dcs}): each deployment's environment does"
        );
    }
    assert_eq!(patroni["scope"], cfg.clusters[0].scope.as_str());
    assert_eq!(
        patroni["namespace"].as_str().unwrap().trim_matches('/'),
        cfg.clusters[0].namespace.trim_matches('/')
    );
    let mut names = BTreeSet::new();
    for i in 1..=3 {
        let env = &services[&format!("patroni{i}")]["environment"];
        assert_eq!(env["PATRONI_ETCD3_HOSTS"], endpoint, "the merged anchor");
        names.insert(env["PATRONI_NAME"].as_str().unwrap().to_owned());
    }
    assert_eq!(names.len(), 3, "distinct member names");
}

/// Patroni's DCS sections: it uses the first it finds, so the image's patroni.yml has none
/// and each deployment names its own in the environment.
const DCS_SECTIONS: [&str; 7] = [
    "consul",
    "etcd",
    "etcd3",
    "exhibitor",
    "kubernetes",
    "raft",
    "zookeeper",
];

/// Every document of a kustomization directory, after checking that it lists every file there.
fn manifests(dir: &str) -> Vec<Value> {
    let mut docs = Vec::new();
    let kustomization = &yaml(&format!("{dir}/kustomization.yaml"))[0];
    let listed: Vec<&str> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    for entry in std::fs::read_dir(docker(dir)).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name != "kustomization.yaml" {
            assert!(
                listed.contains(&name.as_str()),
                "{dir}/{name} not in kustomization"
            );
        }
    }
    for file in &listed {
        docs.extend(yaml(&format!("{dir}/{file}")));
    }
    for d in &docs {
        assert!(
            d["apiVersion"].is_string()
                && d["kind"].is_string()
                && d["metadata"]["name"].is_string(),
            "{d}"
        );
    }
    docs
}

fn by_kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The Deployment's Services: `demo` (writes) and `demo-repl` (reads) select its pods, on
/// port 5432 to the listeners' ports; its container ports are what the image exposes.
fn check_services(docs: &[Value], deploy: &Value, cfg: &Config, img: &Image) {
    let labels = &deploy["spec"]["template"]["metadata"]["labels"];
    for (svc, role) in [
        ("demo", ListenerRole::Primary),
        ("demo-repl", ListenerRole::Replica),
    ] {
        let s = by_kind(docs, "Service", svc);
        assert_eq!(&s["spec"]["selector"], labels, "{svc} selects patroxy");
        assert_eq!(
            s["spec"]["ports"][0]["port"], 5432,
            "{svc}: where clients expect it"
        );
        assert_eq!(
            s["spec"]["ports"][0]["targetPort"],
            listener_port(cfg, role),
            "{svc}"
        );
    }
    let container_ports: BTreeSet<u64> = deploy["spec"]["template"]["spec"]["containers"][0]
        ["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    assert_eq!(
        container_ports,
        img.exposed.iter().map(|p| *p as u64).collect()
    );
}

/// Checks a pod's patroxy container against the configuration it mounts; returns that config.
fn check_patroxy_container(docs: &[Value], pod: &Value, container: &Value, img: &Image) -> Config {
    let args: Vec<&str> = container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let path = args[args.iter().position(|a| *a == "--config").unwrap() + 1];
    let (dir, file) = path.rsplit_once('/').unwrap();
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    let map = volume["configMap"]["name"].as_str().unwrap();
    let text = by_kind(docs, "ConfigMap", map)["data"][file]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {map} has no {file}"));
    let cfg = config(map, text);
    let (_, admin) = ports(&cfg);
    for (probe, path) in [("livenessProbe", "/health"), ("readinessProbe", "/ready")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], admin, "{probe} on the admin port");
        assert!(patroxy::admin::PATHS.contains(&path));
    }
    let user = pod["securityContext"]["runAsUser"]
        .as_u64()
        .or(container["securityContext"]["runAsUser"].as_u64())
        .expect("runAsUser");
    assert_eq!(user.to_string(), img.user, "the image's user");
    cfg
}

#[test]
fn the_kubernetes_manifests_agree_with_the_code() {
    let img = image();
    let docs = manifests("k8s");

    // Etcd: the name patroxy and Patroni use resolves to its pod through a headless Service.
    let etcd = by_kind(&docs, "StatefulSet", "etcd");
    let etcd_svc = by_kind(
        &docs,
        "Service",
        etcd["spec"]["serviceName"].as_str().unwrap(),
    );
    assert_eq!(etcd_svc["spec"]["clusterIP"], "None");
    let etcd_host = "etcd-0.etcd:2379";

    // Patroni: a StatefulSet with volumes, named by a headless Service.
    let pg = by_kind(&docs, "StatefulSet", "demo");
    let members = by_kind(
        &docs,
        "Service",
        pg["spec"]["serviceName"].as_str().unwrap(),
    );
    assert_eq!(members["spec"]["clusterIP"], "None");
    assert_eq!(
        members["spec"]["selector"],
        pg["spec"]["template"]["metadata"]["labels"]
    );
    assert!(pg["spec"]["volumeClaimTemplates"]
        .as_array()
        .is_some_and(|v| !v.is_empty()));
    let patroni = &pg["spec"]["template"]["spec"]["containers"][0];
    let env = patroni["env"].as_array().unwrap();
    let hosts = env
        .iter()
        .find(|e| e["name"] == "PATRONI_ETCD3_HOSTS")
        .unwrap();
    assert_eq!(hosts["value"], etcd_host);
    let data_dir = yaml("patroni/patroni.yml")[0]["postgresql"]["data_dir"]
        .as_str()
        .unwrap()
        .to_owned();
    let mount = patroni["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(
        data_dir.starts_with(&format!("{mount}/")),
        "{data_dir} on the volume"
    );

    // patroxy as a Deployment: the ConfigMap is docker/patroxy.toml with etcd's in-cluster name.
    let deploy = by_kind(&docs, "Deployment", "patroxy");
    let pod = &deploy["spec"]["template"]["spec"];
    let cfg = check_patroxy_container(&docs, pod, &pod["containers"][0], &img);
    assert_eq!(cfg.etcd.endpoints, vec![format!("http://{etcd_host}")]);
    let image_cfg = Config::load(&docker("patroxy.toml")).unwrap();
    assert_eq!(cfg.listeners, image_cfg.listeners);
    assert_eq!(cfg.admin, image_cfg.admin);
    assert_eq!(cfg.clusters, image_cfg.clusters);
    check_services(&docs, deploy, &cfg, &img);

    // patroxy as a sidecar: loopback listeners for the application, the admin endpoint on the
    // pod's address for the kubelet's probes, started before the application.
    let app = by_kind(&docs, "Deployment", "app");
    let pod = &app["spec"]["template"]["spec"];
    let sidecar = &pod["initContainers"][0];
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    let cfg = check_patroxy_container(&docs, pod, sidecar, &img);
    assert!(cfg
        .listeners
        .iter()
        .all(|l| l.listen.starts_with("127.0.0.1:")));
    assert!(cfg.admin.listen.as_deref().unwrap().starts_with("0.0.0.0:"));
    let app_env = pod["containers"][0]["env"].as_array().unwrap();
    let pgport = app_env.iter().find(|e| e["name"] == "PGPORT").unwrap();
    assert_eq!(
        pgport["value"],
        listener_port(&cfg, ListenerRole::Primary).to_string()
    );
    the_examples_fence_the_admin_endpoint(&docs, deploy);
}

/// The Deployment publishes its pod's IP as where the other instance sends cancels (it
/// listens on 0.0.0.0), and NetworkPolicies let only the monitoring namespace reach the
/// admin endpoint of either example, and only clients and peers reach the listeners.
fn the_examples_fence_the_admin_endpoint(docs: &[Value], deploy: &Value) {
    let env = deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .expect("the patroxy container's env");
    let address = env
        .iter()
        .find(|e| e["name"] == "PATROXY_REPORT_ADDRESS")
        .expect("PATROXY_REPORT_ADDRESS");
    assert_eq!(
        address["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_patroxy"))
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&help.stdout).contains("PATROXY_REPORT_ADDRESS"));
    for (policy, pods) in [("patroxy", "patroxy"), ("demo-app", "demo-app")] {
        let p = by_kind(docs, "NetworkPolicy", policy);
        assert_eq!(p["spec"]["podSelector"]["matchLabels"]["app"], pods);
        for rule in p["spec"]["ingress"].as_array().unwrap() {
            let ports: Vec<u64> = rule["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["port"].as_u64().unwrap())
                .collect();
            if ports.contains(&9187) {
                assert_eq!(
                    ports,
                    vec![9187],
                    "{policy}: the admin port has a rule of its own"
                );
                assert!(rule["from"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|f| f["namespaceSelector"].is_object()));
            }
        }
    }
}

/// A container's `env`, by name: the value, or the field a `valueFrom` reads.
fn env_of(container: &Value) -> std::collections::BTreeMap<String, Value> {
    container["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let v = if e["value"].is_string() {
                e["value"].clone()
            } else {
                e["valueFrom"]["fieldRef"]["fieldPath"].clone()
            };
            (e["name"].as_str().unwrap().to_owned(), v)
        })
        .collect()
}

/// Whether a Role grants `verbs` on `resource` (core API group).
fn grants(role: &Value, resource: &str, verbs: &[&str]) -> bool {
    role["rules"].as_array().unwrap().iter().any(|r| {
        let has = |key: &str, v: &str| r[key].as_array().unwrap().iter().any(|x| x == v);
        has("apiGroups", "") && has("resources", resource) && verbs.iter().all(|v| has("verbs", v))
    })
}

#[test]
fn the_kubernetes_dcs_variant_agrees_with_the_code() {
    let img = image();
    let docs = manifests("k8s-rest");
    let patroni_yml = &yaml("patroni/patroni.yml")[0];
    let scope = patroni_yml["scope"].as_str().unwrap();

    // Patroni on the Kubernetes DCS: no etcd anywhere, no other DCS in its environment.
    assert!(
        !docs.iter().any(|d| d["metadata"]["name"] == "etcd"),
        "no etcd in the Kubernetes-DCS variant"
    );
    let pg = by_kind(&docs, "StatefulSet", "demo");
    let pod = &pg["spec"]["template"]["spec"];
    let env = env_of(&pod["containers"][0]);
    for dcs in DCS_SECTIONS.iter().filter(|d| **d != "kubernetes") {
        let prefix = format!("PATRONI_{}_", dcs.to_uppercase());
        assert!(
            !env.keys().any(|k| k.starts_with(&prefix)),
            "{prefix}* would make Patroni pick {dcs}"
        );
    }
    // Patroni copies its top-level namespace over the kubernetes section's (dcs/__init__.py,
    // get_dcs), so the effective Kubernetes namespace is PATRONI_NAMESPACE, else the file's.
    let k8s_namespace = env
        .get("PATRONI_NAMESPACE")
        .or(env
            .get("PATRONI_KUBERNETES_NAMESPACE")
            .filter(|_| patroni_yml["namespace"].is_null()))
        .unwrap_or(&patroni_yml["namespace"]);
    assert_eq!(
        k8s_namespace, "metadata.namespace",
        "the pods' own namespace"
    );
    assert!(env.contains_key("PATRONI_KUBERNETES_POD_IP"));
    // Patroni lists its members by its labels plus cluster-name=<scope>: the pods carry both.
    let labels = &pg["spec"]["template"]["metadata"]["labels"];
    let wanted = yaml_value(env["PATRONI_KUBERNETES_LABELS"].as_str().unwrap());
    for (k, v) in wanted.as_object().unwrap() {
        assert_eq!(&labels[k], v, "pod label {k}");
    }
    assert_eq!(labels["cluster-name"], scope, "the scope label");
    assert_eq!(&pg["spec"]["selector"]["matchLabels"], labels);

    // What the Kubernetes DCS does, and no more: its keys are ConfigMaps, its state and role
    // labels are on its own pods.
    let account = pod["serviceAccountName"]
        .as_str()
        .expect("a service account");
    by_kind(&docs, "ServiceAccount", account);
    let binding = docs
        .iter()
        .find(|d| {
            d["kind"] == "RoleBinding"
                && d["subjects"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|s| s["name"] == account))
        })
        .expect("a RoleBinding for Patroni's account");
    let role = by_kind(&docs, "Role", binding["roleRef"]["name"].as_str().unwrap());
    let keys = ["get", "list", "watch", "create", "patch", "update"];
    assert!(grants(role, "configmaps", &keys), "{role}");
    assert!(
        grants(role, "pods", &["get", "list", "watch", "patch"]),
        "{role}"
    );

    // Each member is named, ready or not, for patroxy's rest.urls.
    let members = by_kind(
        &docs,
        "Service",
        pg["spec"]["serviceName"].as_str().unwrap(),
    );
    assert_eq!(members["spec"]["clusterIP"], "None");
    assert_eq!(members["spec"]["publishNotReadyAddresses"], true);
    assert_eq!(&members["spec"]["selector"], labels);
    let api = port(patroni_yml["restapi"]["listen"].as_str().unwrap());
    assert!(members["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["port"] == api));

    // patroxy polls every member's REST API and keeps no report (it lives in etcd).
    let deploy = by_kind(&docs, "Deployment", "patroxy");
    let ppod = &deploy["spec"]["template"]["spec"];
    let cfg = check_patroxy_container(&docs, ppod, &ppod["containers"][0], &img);
    let cluster = &cfg.clusters[0];
    assert_eq!(cluster.dcs, patroxy::config::Dcs::Rest);
    assert_eq!(cluster.scope, scope);
    let urls: Vec<String> = (0..pg["spec"]["replicas"].as_u64().unwrap())
        .map(|i| {
            let (set, svc) = (&pg["metadata"]["name"], &members["metadata"]["name"]);
            format!(
                "http://{}-{i}.{}:{api}",
                set.as_str().unwrap(),
                svc.as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(cluster.rest.urls, urls);
    assert!(!cfg.uses_etcd(), "nothing may need etcd");
    let image_cfg = Config::load(&docker("patroxy.toml")).unwrap();
    assert_eq!(cfg.listeners, image_cfg.listeners);
    assert_eq!(cfg.admin, image_cfg.admin);
    // Without the report, a cancel must reach the instance that holds its session: the
    // Services keep a client on one instance.
    check_services(&docs, deploy, &cfg, &img);
    let plabels = &deploy["spec"]["template"]["metadata"]["labels"];
    for svc in ["demo", "demo-repl"] {
        let s = by_kind(&docs, "Service", svc);
        assert_eq!(s["spec"]["sessionAffinity"], "ClientIP", "{svc}");
    }
    // The members' REST API and PostgreSQL are reachable from patroxy.
    let fence = docs
        .iter()
        .find(|d| {
            d["kind"] == "NetworkPolicy" && &d["spec"]["podSelector"]["matchLabels"] == labels
        })
        .expect("a NetworkPolicy for the members");
    let from_patroxy = fence["spec"]["ingress"]
        .as_array()
        .unwrap()
        .iter()
        .any(|i| {
            i["from"]
                .as_array()
                .unwrap()
                .iter()
                .any(|f| &f["podSelector"]["matchLabels"] == plabels)
                && [api, 5432].iter().all(|p| {
                    i["ports"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|x| x["port"] == *p)
                })
        });
    assert!(from_patroxy, "{fence}");
}
