//! A world of simulated instances, for the ssh and ansible tests and the ansible benchmark:
//! an emulator whose group's subnet is a `HostNet`'s /24, so each instance can be given a
//! real sshd at its private IP, with its host keys in the console output.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::hosts::{ansible_playbook_path, HostNet, SimHost};
use super::{path_str, root, Aws, Emulator, Provision, Queue};

/// The marker playbook on the web layer: each host writes a marker under SIM_ROOT/<id>.
pub const MARKER_LAYER: &str = r#"
[layers.web]
groups = ["web-*"]
vars = { role = "[a-z]{1,16}" }
launch = [ { ansible = "marker.yml", vars = { role = "{metadata.role}", sim_root = "SIM_ROOT" } } ]
"#;

/// One test's world: an emulator, a simulated network, a queue and a group in that network.
pub struct SimWorld {
    pub group: String,
    pub net: HostNet,
    pub emu: Emulator,
    pub aws: Aws,
    pub q: Queue,
    /// Simulated hosts write under sim_root/<instance id>.
    pub sim_root: PathBuf,
}

impl SimWorld {
    pub async fn new(group: &str, heartbeat: i32, metadata: Option<&str>) -> SimWorld {
        SimWorld::on(HostNet::new(), group, heartbeat, metadata).await
    }

    /// A world on an existing network: the emulator numbers the subnet's instances from .4
    /// again, so hosts started there earlier serve this world's instances too.
    pub async fn on(net: HostNet, group: &str, heartbeat: i32, metadata: Option<&str>) -> SimWorld {
        let mut world = super::World::builder(group)
            .heartbeat(heartbeat)
            .subnet(&net.vpc_cidr(), &net.cidr());
        if let Some(m) = metadata {
            world = world.metadata(m);
        }
        let super::World { emu, aws, q, .. } = world.start().await;
        let sim_root = emu.dir.path().join("sim");
        std::fs::create_dir_all(&sim_root).unwrap();
        SimWorld {
            group: group.to_string(),
            net,
            emu,
            aws,
            q,
            sim_root,
        }
    }

    /// Scales the group to `n` and gives each new instance a simulated host (made by
    /// `make`, from the net and the instance's IP), with its keys in the console output.
    pub async fn launch(
        &self,
        group: &str,
        n: i32,
        make: impl Fn(&HostNet, &str) -> SimHost,
    ) -> Vec<(String, SimHost)> {
        self.aws.scale(group, n).await;
        let world = (&self.emu, &self.aws, &self.net);
        simulate_instances(world, group, &self.sim_root, make).await
    }

    pub fn dir(&self, id: &str) -> PathBuf {
        self.sim_root.join(id)
    }

    /// `provision` set up for the simulated hosts: root over SSH with the net's key.
    pub fn provision(&self, layers: &str) -> Provision {
        self.provision_with(layers, "")
    }

    /// `ansible_extra`: keys of the `[ansible]` table, over the ones set here.
    pub fn provision_with(&self, layers: &str, ansible_extra: &str) -> Provision {
        let layers = layers.replace("SIM_ROOT", path_str(&self.sim_root));
        let mut p = Provision::new(&self.emu, &self.q, None, &layers);
        reach_simulated_hosts(&mut p, &self.net);
        p.merge(&format!("[ansible]\n{ansible_extra}"));
        p
    }
}

/// Gives each instance of `group` a simulated host (made by `make`, from the net and the
/// instance's IP) with its keys in the console output, and a directory under `sim_root`.
pub async fn simulate_instances(
    (emu, aws, net): (&Emulator, &Aws, &HostNet),
    group: &str,
    sim_root: &Path,
    make: impl Fn(&HostNet, &str) -> SimHost,
) -> Vec<(String, SimHost)> {
    let mut out = Vec::new();
    for (id, _) in aws.instances(group).await {
        let ip = aws.private_ip(&id).await;
        let host = make(net, &ip);
        emu.control(
            "POST",
            &format!("/_emulator/console/{id}"),
            Some(json!({ "host_keys": [host.public_key_line()] })),
        );
        std::fs::create_dir_all(sim_root.join(&id)).unwrap();
        out.push((id, host));
    }
    out
}

/// `provision` set up to reach `net`'s hosts: root over SSH with the net's key, the test
/// playbooks, Ansible from the venv.
pub fn reach_simulated_hosts(p: &mut Provision, net: &HostNet) {
    p.set("ssh.user", "root");
    p.set("ssh.identity_file", path_str(net.client_key()));
    p.set("ssh.connect_timeout", "3s");
    p.set("ssh.ready_timeout", "60s");
    p.set(
        "ansible.playbook_dir",
        path_str(&root().join("tests/playbooks")),
    );
    p.set(
        "ansible.ansible_playbook",
        path_str(&ansible_playbook_path()),
    );
    p.set_env("ANSIBLE_PYTHON_INTERPRETER", "/usr/bin/python3");
    // Decided by provision (ansible.pipelining), whatever its environment says.
    p.set_env("ANSIBLE_PIPELINING", "0");
    // Stopping the daemon releases a replacement instance's wait at once.
    p.set("daemon.shutdown_grace", "1s");
}

pub fn ansible_logs(p: &Provision) -> Vec<PathBuf> {
    match std::fs::read_dir(p.dir.join("ansible-logs")) {
        Ok(d) => d.map(|e| e.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

pub fn results_by_instance(emu: &Emulator) -> std::collections::BTreeMap<String, Value> {
    emu.finished_actions()
        .into_iter()
        .map(|a| (a["instance_id"].as_str().unwrap().to_string(), a))
        .collect()
}

pub fn run_error(p: &Provision, id: &str) -> String {
    let run = p
        .history()
        .into_iter()
        .find(|r| r.instance_id.as_deref() == Some(id))
        .unwrap_or_else(|| panic!("no run for {id}"));
    format!("{:?} {:?}", run.error, run.steps)
}
