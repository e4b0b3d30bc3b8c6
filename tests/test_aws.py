"""The AWS path as far as one machine takes it, against moto's emulator of EC2, IAM, EFS, S3,
STS and SSM serving on 127.0.0.1: cluster/aws_setup.py, then Ray 2.60's own AWS code on the
file it writes (the config bootstrap of `ray up`, then its node provider launching the head
and each GPU worker type, and terminating them as `ray down` does), then
cluster/aws_teardown.py.

Nothing leaves 127.0.0.1: every AWS_* variable is replaced (AWS_ENDPOINT_URL points every
boto3 client, Ray's included, at the emulator; the credentials are fake), and while these
tests run an audit hook refuses any connection or name lookup that is not loopback.

Every AWS call Ray makes here is one moto implements (RAY_CALLS). What moto cannot show,
and so neither can this: it evaluates no IAM Resource or Condition element (the policies are
checked as documents instead); instances never boot, so no SSH, Docker, GPU driver or EFS
mount; `ray up`'s node updater and `ray down`'s `ray stop` and `docker stop` run over SSH and
are left out; capacity, quotas and prices do not exist in it. Where it differs from AWS: it
leaves SpotInstanceRequestId empty on spot instances (InstanceLifecycle says spot), defaults
a root volume's DeleteOnTermination to false (AWS takes the AMI's, true for the DLAMI), lacks
ListInstanceProfileTags (the scripts read GetInstanceProfile's tags), and answers an
existing service-linked role with EntityAlreadyExists (AWS: InvalidInput).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.exceptions import ClientError

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster"
REGION, NAME, BUCKET, CIDR = "us-west-2", "clip-sae", "clip-sae-test-bucket", "203.0.113.7/32"
LOOPBACK = {"127.0.0.1", "::1", "localhost", b"127.0.0.1", b"localhost"}
DLAMI_NAME = "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) 20250101"

# Every AWS call Ray 2.60 makes for `ray up` of the filled-in cluster.yaml, the autoscaler's
# worker launches and `ray down` (which repeats `ray up`'s bootstrap): what the test below
# makes Ray do, and what moto answers. SSH and what runs over it are left out.
RAY_CALLS = {
    ("ec2", "DescribeInstanceTypes"),  # resources of each instance type (GPUs, CPUs, memory)
    ("ec2", "DescribeKeyPairs"),
    ("ec2", "CreateKeyPair"),  # the SSH key ray-autoscaler_<region>
    ("ec2", "DescribeSecurityGroups"),  # the VPC of the configured group
    ("ec2", "DescribeSubnets"),  # its subnets in the configured zones
    ("ec2", "RunInstances"),  # the head, then the workers
    ("ec2", "DescribeInstances"),  # finding the nodes, their addresses and states
    ("ec2", "CreateTags"),  # the node updater's status tags
    ("ec2", "TerminateInstances"),
}

_guard = {"on": False, "refused": []}


def _loopback_only(event: str, args: tuple) -> None:
    if not _guard["on"] or event not in ("socket.connect", "socket.getaddrinfo"):
        return
    address = args[1] if event == "socket.connect" else args
    host = address[0] if isinstance(address, tuple) else None  # None: a Unix socket
    if host is not None and host not in LOOPBACK:
        _guard["refused"].append((event, host))
        raise ConnectionRefusedError(f"tests/test_aws.py: {event} {host}: not 127.0.0.1")


sys.addaudithook(_loopback_only)


class Aws:
    """The emulator's endpoint and clients for it, and the AWS calls Ray's code made."""

    def __init__(self, endpoint: str, tmp: Path):
        self.endpoint, self.tmp, self.calls = endpoint, tmp, []
        self.session = boto3.Session(region_name=REGION)  # the test's own, not recorded

    def client(self, name: str):
        return self.session.client(name)

    def record(self, model, **_):
        self.calls.append((model.service_model.service_name, model.name))


def _clear_ray_caches() -> None:
    from ray.autoscaler._private.aws import config, utils

    utils.resource_cache.cache_clear()
    utils.client_cache.cache_clear()
    config._get_subnets_or_die.cache_clear()


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    tmp = tmp_path_factory.mktemp("aws")
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(key)  # no profile, region or per-service endpoint of the user's
        mp.setenv("AWS_ENDPOINT_URL", endpoint)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", REGION)
        mp.setenv("AWS_CONFIG_FILE", str(tmp / "no-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-credentials"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("HOME", str(tmp))  # Ray writes its SSH key to ~/.ssh
        mp.syspath_prepend(str(CLUSTER))
        # Ray's boto3 clients come from boto3's default session: a fresh one, recorded.
        mp.setattr(boto3, "DEFAULT_SESSION", None)
        boto3.setup_default_session()
        state = Aws(endpoint, tmp)
        boto3.DEFAULT_SESSION.events.register("before-call.*.*", state.record)
        _clear_ray_caches()
        _guard["on"] = True
        try:
            with pytest.raises(ConnectionRefusedError):  # the guard is on
                socket.getaddrinfo("ec2.us-west-2.amazonaws.com", 443)
            _guard["refused"].clear()
            urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset", b""))
            yield state
        finally:
            _guard["on"] = False
            _clear_ray_caches()
            server.stop()
    assert _guard["refused"] == [], f"connections outside 127.0.0.1: {_guard['refused']}"


def run_setup(cidr: str, ami: str, out: Path) -> int:
    import aws_setup

    return aws_setup.main(["--ssh-cidr", cidr, "--bucket", BUCKET, "--ami", ami, "--out", str(out)])


@pytest.fixture(scope="module")
def made(aws):
    """The setup run once, with the AMI behind an SSM parameter as AWS publishes the DLAMI's."""
    ec2 = aws.client("ec2")
    ami = ec2.register_image(Name=DLAMI_NAME, RootDeviceName="/dev/sda1")["ImageId"]
    aws.client("ssm").put_parameter(Name="/clip-sae-test/dlami", Value=ami, Type="String")
    out = aws.tmp / "cluster-aws.yaml"
    shipped = (ROOT / "cluster.yaml").read_bytes()
    assert run_setup(CIDR, "/clip-sae-test/dlami", out) == 0
    assert (ROOT / "cluster.yaml").read_bytes() == shipped  # the template is left alone
    (vpc,) = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    (group,) = ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [NAME]}])[
        "SecurityGroups"
    ]
    subnets = {
        s["AvailabilityZone"]: s["SubnetId"]
        for s in ec2.describe_subnets(Filters=[{"Name": "default-for-az", "Values": ["true"]}])[
            "Subnets"
        ]
    }
    return {
        "out": out,
        "ami": ami,
        "vpc": vpc["VpcId"],
        "group": group["GroupId"],
        "subnets": [subnets["us-west-2a"], subnets["us-west-2b"]],
        "account": aws.client("sts").get_caller_identity()["Account"],
    }


def ingress(ec2, group: str) -> set[tuple]:
    """The group's ingress rules, one (protocol, from, to, source) per source."""
    (g,) = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
    keys = {"IpRanges": "CidrIp", "Ipv6Ranges": "CidrIpv6", "UserIdGroupPairs": "GroupId",
            "PrefixListIds": "PrefixListId"}  # fmt: skip
    rules = set()
    for p in g["IpPermissions"]:
        ports = (None, None) if p["IpProtocol"] == "-1" else (p["FromPort"], p["ToPort"])
        for kind, key in keys.items():
            rules |= {(p["IpProtocol"], *ports, source[key]) for source in p.get(kind, [])}
    return rules


def tag_dict(tags) -> dict:
    return {t["Key"]: t["Value"] for t in tags or []}


# ---- the scripts' command lines ----


def script(name: str, *args: str, cwd: Path):
    # A closed loopback port as the endpoint: an error path that did call AWS fails here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
    }
    return subprocess.run(
        [sys.executable, str(CLUSTER / name), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_scripts_explain_every_option_and_refuse_user_errors_in_one_line(tmp_path):
    sys.path.insert(0, str(CLUSTER))
    try:
        import aws_setup
        import aws_teardown
    finally:
        sys.path.remove(str(CLUSTER))
    for name, module in (("aws_setup.py", aws_setup), ("aws_teardown.py", aws_teardown)):
        out = script(name, "--help", cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        for action in module.build_parser()._actions:
            assert action.help and action.option_strings[-1] in out.stdout, action
    filled = tmp_path / "filled.yaml"
    filled.write_text("cluster_name: clip-sae\n")  # nothing left to fill in
    cases = {
        ("--ssh-cidr", "0.0.0.0/0"): "whole internet",
        ("--ssh-cidr", "::/0"): "whole internet",
        ("--ssh-cidr", "my laptop"): "no address range",
        ("--ssh-cidr", CIDR, "--out", str(filled)): "filled in already",
        ("--ssh-cidr", CIDR, "--config", "none.yaml"): "none.yaml: No such file",
    }
    for args, message in cases.items():
        out = script("aws_setup.py", "--bucket", BUCKET, *args, cwd=tmp_path)
        assert out.returncode == 2 and out.stdout == "", (args, out)
        assert message in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert filled.read_text() == "cluster_name: clip-sae\n"


# Bucket names that break S3's naming rules, each with what the refusal says.
BAD_BUCKETS = {
    'clip"sae': "only lowercase letters",
    "Clip-Sae": "only lowercase letters",
    "clip_sae": "only lowercase letters",
    "clip-sae-": "begin and end",
    "s3://clip-sae": "without s3://",
    "ab": "3 to 63",
    "a" * 64: "3 to 63",
    "clip..sae": "two dots",
    "192.168.5.4": "IP address",
    "xn--clip-sae": "prefix xn--",
    "sthree-clip": "prefix sthree-",
    "clip-sae-s3alias": "suffix -s3alias",
    "clip-sae--x-s3": "suffix --x-s3",
}


def test_the_setup_refuses_a_bad_out_a_wide_ssh_range_or_a_bad_bucket_in_one_line(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x98 not text")
    cases = {
        ("--out", str(folder)): "--out ",
        ("--out", str(binary)): "--out ",
        ("--out", str(tmp_path / "no-such-folder" / "cluster-aws.yaml")): "--out ",
        ("--ssh-cidr", "0.0.0.0/1"): "--ssh-cidr 0.0.0.0/1",
        ("--ssh-cidr", "203.0.113.7/7"): "--ssh-cidr 203.0.113.7/7",
        ("--ssh-cidr", "2000::/3"): "--ssh-cidr 2000::/3",
        **{("--bucket", name): message for name, message in BAD_BUCKETS.items()},
    }
    wanted = {
        str(folder): "is a folder",
        str(binary): "not a text file",
        "0.0.0.0/1": "wider than a /8",
        "203.0.113.7/7": "wider than a /8",
        "2000::/3": "wider than a /32",
    }
    for args, message in cases.items():
        out = script("aws_setup.py", "--ssh-cidr", CIDR, "--bucket", BUCKET, *args, cwd=tmp_path)
        # One line that names the option and what to do, before any AWS call (the endpoint
        # is a closed port: a call would end in "Could not connect" instead).
        assert out.returncode == 2 and out.stdout == "", (args, out)
        assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out
        assert out.stderr.startswith(f"aws_setup.py: error: {args[0]} "), (args, out.stderr)
        assert message in out.stderr and wanted.get(args[1], "") in out.stderr, (args, out)
    assert binary.read_bytes() == b"\xff\xfe\x00\x98 not text"
    # A range no wider than the limits is taken (the run then fails at the closed port).
    for cidr in ("10.0.0.0/8", "2001:db8::/32"):
        out = script("aws_setup.py", "--ssh-cidr", cidr, "--bucket", BUCKET, cwd=tmp_path)
        assert "Could not connect" in out.stderr, (cidr, out.stderr)


# ---- what the setup makes, read back through the emulator's API ----


def test_the_setup_fills_in_every_placeholder_and_leaves_cluster_yaml(aws, made):
    text = made["out"].read_text()
    shipped = (ROOT / "cluster.yaml").read_text()
    assert "REPLACE_ME-" in shipped and "REPLACE_ME-" not in text
    config = yaml.safe_load(text)
    assert config["cluster_name"] == NAME and config["provider"]["region"] == REGION
    for node in config["available_node_types"].values():
        assert node["node_config"]["ImageId"] == made["ami"]
        assert node["node_config"]["SecurityGroupIds"] == [made["group"]]
    (fs,) = aws.client("efs").describe_file_systems(CreationToken=NAME)["FileSystems"]
    assert f"EFS={fs['FileSystemId']};" in text
    assert f"s3://{BUCKET}/mlflow" in text
    # Apart from the ids, the copy is cluster.yaml line for line.
    assert len(text.splitlines()) == len(shipped.splitlines())


def test_the_security_group_admits_ssh_from_the_users_range_alone(aws, made):
    ec2, group = aws.client("ec2"), made["group"]
    assert ingress(ec2, group) == {
        ("tcp", 22, 22, CIDR),
        ("-1", None, None, group),
    }
    (g,) = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
    assert tag_dict(g["Tags"])["ray-cluster-name"] == NAME and g["VpcId"] == made["vpc"]
    for p in g["IpPermissions"]:
        assert {r["CidrIp"] for r in p.get("IpRanges", [])} <= {CIDR}
        assert not p.get("Ipv6Ranges") and not p.get("PrefixListIds")
        if p.get("IpRanges"):
            assert (p["IpProtocol"], p["FromPort"], p["ToPort"]) == ("tcp", 22, 22)
    # EFS answers in both zones, inside the group, encrypted; the bucket is not public.
    efs = aws.client("efs")
    (fs,) = efs.describe_file_systems(CreationToken=NAME)["FileSystems"]
    assert fs["Encrypted"] and tag_dict(fs["Tags"])["ray-cluster-name"] == NAME
    targets = efs.describe_mount_targets(FileSystemId=fs["FileSystemId"])["MountTargets"]
    assert sorted(t["SubnetId"] for t in targets) == sorted(made["subnets"])
    for t in targets:
        groups = efs.describe_mount_target_security_groups(MountTargetId=t["MountTargetId"])
        assert groups["SecurityGroups"] == [group]
    s3 = aws.client("s3")
    assert tag_dict(s3.get_bucket_tagging(Bucket=BUCKET)["TagSet"])["ray-cluster-name"] == NAME
    block = s3.get_public_access_block(Bucket=BUCKET)["PublicAccessBlockConfiguration"]
    assert all(block.values()) and len(block) == 4


def test_a_rerun_changes_nothing_but_the_ssh_range(aws, made):
    ec2, efs, iam = aws.client("ec2"), aws.client("efs"), aws.client("iam")

    def inventory():
        groups = ec2.describe_security_groups(
            Filters=[{"Name": "tag:ray-cluster-name", "Values": [NAME]}]
        )["SecurityGroups"]
        systems = efs.describe_file_systems()["FileSystems"]
        targets = [
            efs.describe_mount_targets(FileSystemId=f["FileSystemId"])["MountTargets"]
            for f in systems
        ]
        return (
            [g["GroupId"] for g in groups],
            [f["FileSystemId"] for f in systems],
            sorted(t["MountTargetId"] for ts in targets for t in ts),
            sorted(r["RoleName"] for r in iam.list_roles()["Roles"]),
            sorted(p["Arn"] for p in iam.list_instance_profiles()["InstanceProfiles"]),
        )

    before = inventory()
    # The same output file is never written over once filled in.
    first = made["out"].read_text()
    assert run_setup(CIDR, made["ami"], made["out"]) == 2
    assert made["out"].read_text() == first
    # A new address replaces the old one: SSH is open to the latest range alone.
    moved = aws.tmp / "moved.yaml"
    assert run_setup("198.51.100.0/24", made["ami"], moved) == 0
    assert moved.read_text() == first and inventory() == before
    assert ("tcp", 22, 22, "198.51.100.0/24") in ingress(ec2, made["group"])
    assert ("tcp", 22, 22, CIDR) not in ingress(ec2, made["group"])
    again = aws.tmp / "again.yaml"
    assert run_setup(CIDR, made["ami"], again) == 0
    assert again.read_text() == first and inventory() == before
    assert len(ingress(ec2, made["group"])) == 2


def test_a_bad_bucket_name_is_refused_before_any_aws_call(aws, made, monkeypatch):
    import aws_setup

    ec2, efs, iam, s3 = (aws.client(s) for s in ("ec2", "efs", "iam", "s3"))

    def inventory():
        return (
            sorted(g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]),
            sorted(f["FileSystemId"] for f in efs.describe_file_systems()["FileSystems"]),
            sorted(r["RoleName"] for r in iam.list_roles()["Roles"]),
            {
                r["RoleName"]: iam.get_role_policy(
                    RoleName=r["RoleName"], PolicyName=r["RoleName"]
                )["PolicyDocument"]
                for r in iam.list_roles()["Roles"]
                if r["RoleName"].startswith(NAME)
            },
            sorted(b["Name"] for b in s3.list_buckets()["Buckets"]),
        )

    calls = []
    session = boto3.Session

    def recorded(*args, **kwargs):
        made_session = session(*args, **kwargs)
        made_session.events.register("before-call.*.*", lambda model, **_: calls.append(model))
        return made_session

    monkeypatch.setattr(aws_setup.boto3, "Session", recorded)
    before = inventory()
    for name in BAD_BUCKETS:
        out = aws.tmp / "bad-bucket.yaml"
        argv = ["--ssh-cidr", CIDR, "--bucket", name, "--ami", made["ami"], "--out", str(out)]
        assert aws_setup.main(argv) == 2, name
        assert calls == [] and not out.exists(), name
    assert inventory() == before


def test_the_roles_hold_the_repositorys_policies_and_nothing_more(aws, made):
    iam = aws.client("iam")

    def expected(role: str) -> dict:
        text = (CLUSTER / f"iam-{role}-policy.json").read_text()
        text = text.replace("REPLACE_ME-account-id", made["account"])
        return json.loads(text.replace("REPLACE_ME-bucket", BUCKET))

    trust = json.loads((CLUSTER / "iam-ec2-trust.json").read_text())
    for role in ("head", "worker"):
        name = f"{NAME}-{role}"
        got = iam.get_role_policy(RoleName=name, PolicyName=name)["PolicyDocument"]
        assert got == expected(role)
        assert iam.list_role_policies(RoleName=name)["PolicyNames"] == [name]
        assert iam.list_attached_role_policies(RoleName=name)["AttachedPolicies"] == []
        assert iam.get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"] == trust
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [name]

    def listed(value) -> list:
        return value if isinstance(value, list) else [value]

    head = iam.get_role_policy(RoleName=f"{NAME}-head", PolicyName=f"{NAME}-head")
    for s in head["PolicyDocument"]["Statement"]:
        actions, resources = listed(s["Action"]), listed(s["Resource"])
        conditions = {k: v for c in s.get("Condition", {}).values() for k, v in c.items()}
        assert s["Effect"] == "Allow" and not any("*" in a for a in actions), s
        if "*" in resources:  # on every resource: reading only
            assert all(a.startswith("ec2:Describe") for a in actions), s
        if any(":instance/" in r for r in resources) and set(actions) - {"ec2:CreateTags"}:
            # Launching, ending: only the cluster's instances, by its tag.
            assert NAME in (
                conditions.get("aws:RequestTag/ray-cluster-name"),
                conditions.get("aws:ResourceTag/ray-cluster-name"),
            ), s
        if "ec2:CreateTags" in actions:
            assert (
                conditions.get("aws:ResourceTag/ray-cluster-name") == NAME
                or conditions.get("ec2:CreateAction") == "RunInstances"
            ), s
        if "iam:PassRole" in actions:
            assert resources == [f"arn:aws:iam::{made['account']}:role/{NAME}-worker"], s
    worker = iam.get_role_policy(RoleName=f"{NAME}-worker", PolicyName=f"{NAME}-worker")
    for s in worker["PolicyDocument"]["Statement"]:
        assert all(a.startswith("s3:") for a in listed(s["Action"])), s
        assert all(r.startswith(f"arn:aws:s3:::{BUCKET}") for r in listed(s["Resource"])), s


# ---- Ray's own AWS code on the file ----


def test_ray_takes_the_file_as_written_and_launches_each_node_type(aws, made):
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.aws.utils import resource_cache
    from ray.autoscaler._private.commands import _bootstrap_config
    from ray.autoscaler._private.util import hash_launch_conf, prepare_config
    from ray.autoscaler.tags import (
        NODE_KIND_HEAD,
        STATUS_UNINITIALIZED,
        STATUS_UP_TO_DATE,
        TAG_RAY_LAUNCH_CONFIG,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_NODE_STATUS,
        TAG_RAY_USER_NODE_TYPE,
    )
    from ray.autoscaler.v2.instance_manager.config import FileConfigReader
    from ray.autoscaler.v2.instance_manager.node_provider import NodeProviderAdapter

    ec2, iam = aws.client("ec2"), aws.client("iam")
    raw = yaml.safe_load(made["out"].read_text())

    def inventory():
        return (
            sorted(g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]),
            sorted(r["RoleName"] for r in iam.list_roles()["Roles"]),
            sorted(
                p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
            ),
        )

    before = inventory()
    aws.calls.clear()
    # `ray up`'s bootstrap: defaults, instance resources from EC2, schema, then bootstrap_aws.
    resolved = _bootstrap_config(copy.deepcopy(raw), no_config_cache=True)
    assert resource_cache("ec2", REGION).meta.client.meta.endpoint_url == aws.endpoint
    prepared = prepare_config(copy.deepcopy(raw))
    key = "ray-autoscaler_us-west-2"
    for name, node in resolved["available_node_types"].items():
        # What Ray adds and nothing else: its SSH key, and the default subnets of the two
        # zones, the ones the EFS mount targets are in. AMI, group and profile are as given.
        given = prepared["available_node_types"][name]["node_config"]
        assert node["node_config"] == {**given, "KeyName": key, "SubnetIds": made["subnets"]}
    assert resolved["head_node"] == {}  # no default instance profile
    assert inventory() == before  # no security group, role or profile made
    assert Path(resolved["auth"]["ssh_private_key"]) == aws.tmp / ".ssh" / f"{key}.pem"
    types = resolved["available_node_types"]
    assert types["head"]["resources"] == {"CPU": 0}
    for name in ("gpu_spot", "gpu_on_demand"):  # autodetected from g5.2xlarge
        assert {
            k: types[name]["resources"][k] for k in ("CPU", "GPU", "accelerator_type:A10G")
        } == {"CPU": 8, "GPU": 1, "accelerator_type:A10G": 1}

    # The head, launched as `ray up` launches it (get_or_create_head_node) ...
    provider = AWSNodeProvider(resolved["provider"], resolved["cluster_name"])
    head_config = {**resolved["head_node"], **types["head"]["node_config"]}
    provider.create_node(
        head_config,
        {
            TAG_RAY_NODE_KIND: NODE_KIND_HEAD,
            TAG_RAY_USER_NODE_TYPE: "head",
            TAG_RAY_LAUNCH_CONFIG: hash_launch_conf(head_config, resolved["auth"]),
            TAG_RAY_NODE_NAME: f"ray-{NAME}-head",
            TAG_RAY_NODE_STATUS: STATUS_UNINITIALIZED,
        },
        1,
    )
    # Its node updater then finds the head's address and tags its progress (SSH aside).
    (head_id,) = provider.non_terminated_nodes({TAG_RAY_NODE_KIND: NODE_KIND_HEAD})
    assert provider.external_ip(head_id)
    provider.set_node_tags(head_id, {TAG_RAY_NODE_STATUS: STATUS_UP_TO_DATE})
    # ... and one worker of each GPU type, as the head's autoscaler (v2) launches them: its
    # node provider adapter, reading the bootstrapped file `ray up` gives the head.
    head_file = aws.tmp / "ray_bootstrap_config.yaml"
    head_file.write_text(yaml.safe_dump(resolved))
    adapter = NodeProviderAdapter(provider, FileConfigReader(str(head_file)))
    adapter.launch({"gpu_spot": 1, "gpu_on_demand": 1}, request_id="test")
    # The launches run in its two thread pools, the second fed by the first: wait for both.
    adapter._main_executor.shutdown(wait=True)
    adapter._node_launcher_executors.shutdown(wait=True)
    assert [e.__cause__ for e in adapter.poll_errors()] == []
    assert len(adapter.get_non_terminated()) == 3

    ids = provider.non_terminated_nodes({})
    assert len(ids) == 3 and len(provider.non_terminated_nodes({TAG_RAY_NODE_KIND: "head"})) == 1
    reservations = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    launched = {
        tag_dict(i["Tags"])["ray-user-node-type"]: i for r in reservations for i in r["Instances"]
    }
    assert set(launched) == {"head", "gpu_spot", "gpu_on_demand"}
    assert tag_dict(launched["head"]["Tags"])[TAG_RAY_NODE_STATUS] == STATUS_UP_TO_DATE
    shipped = yaml.safe_load((ROOT / "cluster.yaml").read_text())["available_node_types"]
    for name, instance in launched.items():
        want = shipped[name]["node_config"]
        assert tag_dict(instance["Tags"])["ray-cluster-name"] == NAME
        assert instance["InstanceType"] == want["InstanceType"]
        assert instance["ImageId"] == made["ami"] and instance["KeyName"] == key
        assert instance["SubnetId"] in made["subnets"]
        assert [g["GroupId"] for g in instance["SecurityGroups"]] == [made["group"]]
        profile = f"arn:aws:iam::{made['account']}:instance-profile/{NAME}-"
        assert instance["IamInstanceProfile"]["Arn"] == profile + (
            "head" if name == "head" else "worker"
        )
        options = instance["MetadataOptions"]
        assert (options["HttpTokens"], options["HttpEndpoint"]) == ("required", "enabled")
        assert options["HttpPutResponseHopLimit"] == 2
        (mapping,) = instance["BlockDeviceMappings"]
        (disk,) = want["BlockDeviceMappings"]
        (volume,) = ec2.describe_volumes(VolumeIds=[mapping["Ebs"]["VolumeId"]])["Volumes"]
        assert mapping["DeviceName"] == disk["DeviceName"] == "/dev/sda1"
        assert (volume["Size"], volume["VolumeType"]) == (disk["Ebs"]["VolumeSize"], "gp3")
    # The market: spot for gpu_spot, on-demand (no lifecycle) for the others.
    assert launched["gpu_spot"].get("InstanceLifecycle") == "spot"
    assert "InstanceLifecycle" not in launched["gpu_on_demand"]
    assert "InstanceLifecycle" not in launched["head"]

    # `ray down`'s teardown loop (after its `ray stop` over SSH): terminate until none is left.
    deadline = time.monotonic() + 30
    while left := provider.nodes_for_teardown({}):
        assert time.monotonic() < deadline, f"still up: {left}"
        provider.terminate_nodes(left)
    states = ec2.describe_instances(InstanceIds=ids)["Reservations"]
    assert {i["State"]["Name"] for r in states for i in r["Instances"]} == {"terminated"}
    assert set(aws.calls) == RAY_CALLS, sorted(set(aws.calls) ^ RAY_CALLS)


# ---- the teardown ----


def test_the_teardown_deletes_what_the_setup_made_and_nothing_else(aws, made):
    import aws_teardown

    ec2, efs, s3, iam = (aws.client(s) for s in ("ec2", "efs", "s3", "iam"))
    config = str(made["out"])
    # Beside ours: a group Ray could have made for the cluster, and someone else's bucket.
    other = ec2.create_security_group(
        GroupName=f"ray-autoscaler-{NAME}",
        Description="not the setup's",
        VpcId=made["vpc"],
        TagSpecifications=[
            {"ResourceType": "security-group", "Tags": [{"Key": "ray-cluster-name", "Value": NAME}]}
        ],
    )["GroupId"]
    s3.create_bucket(
        Bucket="someone-elses", CreateBucketConfiguration={"LocationConstraint": REGION}
    )
    s3.put_object(Bucket=BUCKET, Key="mlflow/1/artifact.txt", Body=b"x")
    # A node of the cluster still up: refused, nothing deleted.
    (node,) = ec2.run_instances(
        ImageId=made["ami"],
        MinCount=1,
        MaxCount=1,
        SubnetId=made["subnets"][0],
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": "ray-cluster-name", "Value": NAME}]}
        ],
    )["Instances"]
    assert aws_teardown.main(["--config", config, "--yes"]) == 2
    ec2.terminate_instances(InstanceIds=[node["InstanceId"]])
    # Without --yes it only lists.
    assert aws_teardown.main(["--config", config]) == 0
    assert ec2.describe_security_groups(GroupIds=[made["group"]])["SecurityGroups"]

    assert aws_teardown.main(["--config", config, "--yes"]) == 0
    ours = [{"Name": "tag:created-by", "Values": ["cluster/aws_setup.py"]}]
    assert ec2.describe_security_groups(Filters=ours)["SecurityGroups"] == []
    assert efs.describe_file_systems()["FileSystems"] == []
    with pytest.raises(ClientError, match="404|Not Found"):
        s3.head_bucket(Bucket=BUCKET)
    for name in (f"{NAME}-head", f"{NAME}-worker"):
        with pytest.raises(ClientError, match="NoSuchEntity"):
            iam.get_role(RoleName=name)
        with pytest.raises(ClientError, match="NoSuchEntity"):
            iam.get_instance_profile(InstanceProfileName=name)
    # What it did not make is still there.
    assert ec2.describe_security_groups(GroupIds=[other])["SecurityGroups"]
    s3.head_bucket(Bucket="someone-elses")
    # A second run finds nothing to delete.
    assert aws_teardown.main(["--config", config, "--yes"]) == 0
