"""Create what cluster.yaml needs on AWS, then write a copy of it with every id filled in.

Once per account and region, before the first `ray up`. In the region and availability
zones of cluster.yaml's provider section, in the default VPC, it creates:

- the security group: SSH from --ssh-cidr alone, any traffic between the group's members
  (Ray's ports and NFS), nothing else;
- the head and worker IAM roles and instance profiles, each with its policy from
  cluster/iam-head-policy.json or cluster/iam-worker-policy.json;
- the EFS file system (encrypted) and one mount target per availability zone;
- the S3 bucket (public access blocked).

Each is tagged ray-cluster-name=<cluster_name> and created-by=cluster/aws_setup.py, which
is how cluster/aws_teardown.py finds them. A rerun finds what exists and makes it match (a
new --ssh-cidr replaces the old one). Then a dry-run launch of each node type checks that
AWS would accept it, and the filled-in copy is written (never over a filled-in file).

Needs boto3 and your AWS credentials (`aws configure`, or the AWS_* variables).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import sys
import time
from pathlib import Path

import boto3
import yaml
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ROOT / "cluster"
# AWS's Deep Learning Base GPU AMI: NVIDIA driver 570+, Docker and the container toolkit.
DLAMI = "/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"
CREATED_BY = "cluster/aws_setup.py"
PLACEHOLDER = re.compile(r"REPLACE_ME-[\w-]+")
WAIT_S = 300
# The widest --ssh-cidr taken: an IPv4 /8, and an IPv6 /32 (what one ISP is given).
WIDEST = {4: 8, 6: 32}
# What S3 reserves at either end of a bucket name.
PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")


class SetupError(Exception):
    """A problem the user can fix: printed as one line, without a traceback."""


def tags(cluster: str) -> list[dict]:
    return [
        {"Key": "ray-cluster-name", "Value": cluster},
        {"Key": "created-by", "Value": CREATED_BY},
    ]


def ours(tag_list: list[dict] | None, cluster: str) -> bool:
    """Whether a resource carries both of our tags."""
    have = {t["Key"]: t["Value"] for t in tag_list or []}
    return all(have.get(t["Key"]) == t["Value"] for t in tags(cluster))


def code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def wait(done, what: str, timeout_s: float = WAIT_S) -> None:
    """Poll until done() holds: AWS creates and deletes these asynchronously."""
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            raise SetupError(f"gave up after {timeout_s:.0f} s waiting for {what}")
        time.sleep(3)


class Template:
    """What the scripts need from a cluster YAML: names, region, zones, profile names."""

    def __init__(self, path: Path):
        try:
            self.text = path.read_text()
            config = yaml.safe_load(self.text)
            self.cluster = config["cluster_name"]
            self.region = config["provider"]["region"]
            self.zones = [z.strip() for z in config["provider"]["availability_zone"].split(",")]
            types = config["available_node_types"]
            head = config["head_node_type"]
            arn = {k: t["node_config"]["IamInstanceProfile"]["Arn"] for k, t in types.items()}
        except OSError as e:
            raise SetupError(f"{path}: {e.strerror}") from None
        except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
            raise SetupError(f"{path}: not a cluster YAML like cluster.yaml ({e!r})") from None
        self.path = path
        self.node_configs = {k: t["node_config"] for k, t in types.items()}
        # The profiles are named by the ARNs' last part; a role has its profile's name.
        self.head_profile = arn[head].rsplit("/", 1)[-1]
        workers = {a.rsplit("/", 1)[-1] for k, a in arn.items() if k != head}
        if len(workers) != 1:
            raise SetupError(f"{path}: the worker types name different instance profiles")
        (self.worker_profile,) = workers


def parse_cidr(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        net = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise SetupError(f"--ssh-cidr {text!r} is no address range like 203.0.113.7/32") from None
    if net.prefixlen == 0:
        raise SetupError(f"--ssh-cidr {text} would admit SSH from the whole internet")
    if net.prefixlen < WIDEST[net.version]:
        widest = WIDEST[net.version]
        raise SetupError(f"--ssh-cidr {text} would admit SSH from {net}, wider than a /{widest}: "
                         "pass your own address, e.g. 203.0.113.7/32")  # fmt: skip
    return net


def check_bucket(name: str) -> None:
    """S3's naming rules for a general purpose bucket, checked before any AWS call."""
    if name.startswith("s3://"):
        why = "give the name alone, without s3://"
    elif not 3 <= len(name) <= 63:
        why = f"it has {len(name)} characters, not 3 to 63"
    elif not re.fullmatch(r"[a-z0-9][a-z0-9.-]*[a-z0-9]", name):
        why = "use only lowercase letters, digits, dots and hyphens, and begin and end with a "
        why += "letter or digit"
    elif ".." in name:
        why = "it has two dots in a row"
    elif re.fullmatch(r"[0-9]+(\.[0-9]+){3}", name):
        why = "it looks like an IP address"
    elif reserved := [p for p in PREFIXES if name.startswith(p)]:
        why = f"S3 reserves the prefix {reserved[0]}"
    elif reserved := [s for s in SUFFIXES if name.endswith(s)]:
        why = f"S3 reserves the suffix {reserved[0]}"
    else:
        return
    raise SetupError(f"--bucket {name!r} is no S3 bucket name: {why}")


def check_out(out: Path) -> None:
    """--out: a new file in an existing folder, or a copy of the template not filled in yet."""
    if out.is_dir():
        raise SetupError(f"--out {out} is a folder: name a file, e.g. {out / 'cluster-aws.yaml'}")
    if not out.parent.is_dir():
        raise SetupError(f"--out {out}: there is no folder {out.parent}: create it, or pass "
                         "another --out")  # fmt: skip
    if not out.exists():
        return
    try:
        text = out.read_text()
    except UnicodeDecodeError:
        raise SetupError(f"--out {out} is not a text file: pass another --out") from None
    except OSError as e:
        raise SetupError(f"--out {out}: {e.strerror}: pass another --out") from None
    if not PLACEHOLDER.search(text):
        raise SetupError(f"--out {out} is filled in already: pass another --out, or delete it")


def policy(role: str, account: str, bucket: str, t: Template) -> str:
    """cluster/iam-<role>-policy.json with the account and bucket filled in, after checking
    that its cluster tag and region are cluster.yaml's."""
    path = POLICIES / f"iam-{role}-policy.json"
    text = path.read_text().replace("REPLACE_ME-account-id", account)
    text = text.replace("REPLACE_ME-bucket", bucket)
    doc = json.loads(text)
    for statement in doc["Statement"]:
        for values in statement.get("Condition", {}).values():
            for key, value in values.items():
                want = t.region if key == "aws:RequestedRegion" else t.cluster
                if (key == "aws:RequestedRegion" or key.endswith("/ray-cluster-name")) and (
                    value != want
                ):
                    raise SetupError(
                        f"{path.relative_to(ROOT)} conditions {key} on {value!r} but "
                        f"{t.path.name} says {want!r}: make them agree"
                    )
    if PLACEHOLDER.search(text):
        raise SetupError(f"{path.relative_to(ROOT)} has a placeholder this script does not fill")
    return json.dumps(doc)


def find_ami(session, ec2, ami: str) -> str:
    if ami.startswith("/"):  # an SSM parameter that names the AMI
        try:
            ami = session.client("ssm").get_parameter(Name=ami)["Parameter"]["Value"]
        except ClientError as e:
            raise SetupError(f"--ami: no SSM parameter {ami} in this region ({code(e)})") from None
    try:
        if ec2.describe_images(ImageIds=[ami])["Images"]:
            return ami
    except ClientError:
        pass
    raise SetupError(f"--ami: no image {ami} in this region")


def default_subnets(ec2, zones: list[str]) -> tuple[str, dict[str, str]]:
    """The default VPC and its default subnet in each zone: where Ray puts the nodes."""
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
    if not vpcs:
        raise SetupError("this region has no default VPC (`aws ec2 create-default-vpc` makes one)")
    vpc = vpcs[0]["VpcId"]
    default = [{"Name": "vpc-id", "Values": [vpc]}, {"Name": "default-for-az", "Values": ["true"]}]
    found = ec2.describe_subnets(Filters=default)["Subnets"]
    by_zone = {s["AvailabilityZone"]: s["SubnetId"] for s in found}
    missing = [z for z in zones if z not in by_zone]
    if missing:
        raise SetupError(f"the default VPC {vpc} has no default subnet in {', '.join(missing)}")
    return vpc, {z: by_zone[z] for z in zones}


# An ingress rule's kinds of source, and the key that names each source.
SOURCES = {"IpRanges": "CidrIp", "Ipv6Ranges": "CidrIpv6", "UserIdGroupPairs": "GroupId",
           "PrefixListIds": "PrefixListId"}  # fmt: skip


def rules(permissions: list[dict]) -> set[tuple]:
    """Ingress rules as (protocol, from, to, kind, source) atoms, to compare and diff."""
    atoms = set()
    for p in permissions:
        ports = (None, None) if p["IpProtocol"] == "-1" else (p.get("FromPort"), p.get("ToPort"))
        for kind, key in SOURCES.items():
            atoms |= {(p["IpProtocol"], *ports, kind, r[key]) for r in p.get(kind, [])}
    return atoms


def permission(atom: tuple) -> dict:
    protocol, low, high, kind, source = atom
    p = {"IpProtocol": protocol, kind: [{SOURCES[kind]: source}]}
    return p if protocol == "-1" else {**p, "FromPort": low, "ToPort": high}


def security_group(ec2, cluster: str, vpc: str, cidr) -> str:
    found = ec2.describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": [vpc]}, {"Name": "group-name", "Values": [cluster]}]
    )["SecurityGroups"]
    if found and not ours(found[0].get("Tags"), cluster):
        raise SetupError(
            f"security group {cluster} ({found[0]['GroupId']}) exists in {vpc} but this script "
            "did not make it: delete it, or change cluster_name"
        )
    if found:
        group = found[0]["GroupId"]
    else:
        group = ec2.create_security_group(
            GroupName=cluster, VpcId=vpc, Description=f"Ray cluster {cluster}",
            TagSpecifications=[{"ResourceType": "security-group", "Tags": tags(cluster)}],
        )["GroupId"]  # fmt: skip
    kind = "IpRanges" if cidr.version == 4 else "Ipv6Ranges"
    # Ray's nodes talk on ports it picks at random: everything between members is allowed.
    want = {("tcp", 22, 22, kind, str(cidr)), ("-1", None, None, "UserIdGroupPairs", group)}
    (described,) = ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
    have = rules(described["IpPermissions"])
    # Converge: an address given before goes, so SSH is open to the latest --ssh-cidr alone.
    if have - want:
        ec2.revoke_security_group_ingress(
            GroupId=group, IpPermissions=[permission(a) for a in sorted(have - want, key=str)]
        )
    if want - have:
        ec2.authorize_security_group_ingress(
            GroupId=group, IpPermissions=[permission(a) for a in sorted(want - have, key=str)]
        )
    return group


def instance_profile(iam, name: str, document: str, cluster: str) -> str:
    """A role and an instance profile of the same name, holding one inline policy."""
    trust = (POLICIES / "iam-ec2-trust.json").read_text()
    try:
        iam.create_role(RoleName=name, AssumeRolePolicyDocument=trust, Tags=tags(cluster),
                        Description=f"Ray cluster {cluster}, made by {CREATED_BY}")  # fmt: skip
    except ClientError as e:
        if code(e) != "EntityAlreadyExists":
            raise
        if not ours(iam.list_role_tags(RoleName=name)["Tags"], cluster):
            raise SetupError(f"IAM role {name} exists but this script did not make it") from None
        iam.update_assume_role_policy(RoleName=name, PolicyDocument=trust)
    iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=document)
    try:
        profile = iam.create_instance_profile(InstanceProfileName=name, Tags=tags(cluster))
    except ClientError as e:
        if code(e) != "EntityAlreadyExists":
            raise
        profile = None
    if profile is None:
        profile = iam.get_instance_profile(InstanceProfileName=name)
        if not ours(profile["InstanceProfile"].get("Tags"), cluster):
            raise SetupError(f"instance profile {name} exists; this script did not make it")
    profile = profile["InstanceProfile"]
    if name not in [r["RoleName"] for r in profile["Roles"]]:
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
    return profile["Arn"]


def spot_role(iam) -> None:
    """EC2's service-linked role for spot, which a spot launch needs (one per account)."""
    try:
        iam.create_service_linked_role(AWSServiceName="spot.amazonaws.com")
    except ClientError as e:
        # AWS says InvalidInput, "has been taken", when it exists already (moto another).
        if code(e) not in ("InvalidInput", "EntityAlreadyExists"):
            raise


def file_system(efs, cluster: str, subnets: dict[str, str], group: str) -> str:
    found = efs.describe_file_systems(CreationToken=cluster)["FileSystems"]
    if found and not ours(found[0].get("Tags"), cluster):
        raise SetupError(f"EFS {found[0]['FileSystemId']} has creation token {cluster} but "
                         "this script did not make it")  # fmt: skip
    if found:
        fs = found[0]["FileSystemId"]
    else:
        # Elastic throughput: the activation cache is read in bursts by many GPU nodes.
        fs = efs.create_file_system(
            CreationToken=cluster, Encrypted=True, PerformanceMode="generalPurpose",
            ThroughputMode="elastic", Tags=[{"Key": "Name", "Value": cluster}, *tags(cluster)],
        )["FileSystemId"]  # fmt: skip

    def state() -> str:
        return efs.describe_file_systems(FileSystemId=fs)["FileSystems"][0]["LifeCycleState"]

    wait(lambda: state() == "available", f"EFS {fs} to become available")

    def targets() -> list[dict]:
        return efs.describe_mount_targets(FileSystemId=fs)["MountTargets"]

    have = {m["SubnetId"] for m in targets()}
    for subnet in subnets.values():
        if subnet not in have:
            efs.create_mount_target(FileSystemId=fs, SubnetId=subnet, SecurityGroups=[group])
    # The first node mounts the file system as it boots: its targets must be up by then.
    wait(lambda: all(m["LifeCycleState"] == "available" for m in targets()),
         f"the mount targets of {fs}")  # fmt: skip
    return fs


def bucket(s3, name: str, region: str, cluster: str) -> str:
    """Creates the bucket, or takes one of yours as it is (the teardown then leaves it)."""
    # us-east-1 is S3's default location, which takes no LocationConstraint.
    where = {"LocationConstraint": region} if region != "us-east-1" else None
    try:
        s3.create_bucket(Bucket=name, **({"CreateBucketConfiguration": where} if where else {}))
    except ClientError as e:
        if code(e) == "BucketAlreadyExists":
            raise SetupError(f"bucket {name} belongs to another account (names are global): "
                             "choose another --bucket") from None  # fmt: skip
        if code(e) != "BucketAlreadyOwnedByYou":
            raise
        try:
            mine = ours(s3.get_bucket_tagging(Bucket=name)["TagSet"], cluster)
        except ClientError:
            mine = False
        if not mine:
            return "yours, kept as it is"
    s3.put_public_access_block(Bucket=name, PublicAccessBlockConfiguration={
        "BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
        "RestrictPublicBuckets": True})  # fmt: skip
    s3.put_bucket_tagging(Bucket=name, Tagging={"TagSet": tags(cluster)})
    return "created"


def dry_run(ec2, t: Template, values: dict[str, str], subnet: str) -> None:
    """Ask EC2 whether it would launch each node type as the filled-in YAML says: the AMI,
    profile and group exist, and you may launch them (capacity and quota aside)."""
    filled = yaml.safe_load(fill(t.text, values))["available_node_types"]
    for name, node in filled.items():
        conf = {**node["node_config"], "SubnetId": subnet, "MinCount": 1, "MaxCount": 1}

        def accepted(name=name, conf=conf) -> bool:
            try:
                ec2.run_instances(DryRun=True, **conf)
            except ClientError as e:
                # A new instance profile takes a few seconds to reach EC2.
                if code(e) == "InvalidParameterValue" and "instance profile" in str(e).lower():
                    return False
                if code(e) != "DryRunOperation":
                    raise SetupError(f"EC2 would not launch node type {name}: {e}") from None
            return True

        wait(accepted, f"EC2 to accept node type {name}'s instance profile", timeout_s=120)


def fill(text: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def setup(args: argparse.Namespace) -> int:
    t = Template(Path(args.config))
    out = Path(args.out)
    check_out(out)
    cidr = parse_cidr(args.ssh_cidr)
    check_bucket(args.bucket)
    session = boto3.Session(region_name=t.region)
    account = session.client("sts").get_caller_identity()["Account"]
    ec2 = session.client("ec2")
    ami = find_ami(session, ec2, args.ami)
    documents = {role: policy(role, account, args.bucket, t) for role in ("head", "worker")}
    vpc, subnets = default_subnets(ec2, t.zones)

    group = security_group(ec2, t.cluster, vpc, cidr)
    iam = session.client("iam")
    arns = {
        role: instance_profile(iam, name, documents[role], t.cluster)
        for role, name in (("head", t.head_profile), ("worker", t.worker_profile))
    }
    spot_role(iam)
    fs = file_system(session.client("efs"), t.cluster, subnets, group)
    kept = bucket(session.client("s3"), args.bucket, t.region, t.cluster)

    values = {"REPLACE_ME-ami-id": ami, "REPLACE_ME-security-group-id": group,
              "REPLACE_ME-account-id": account, "REPLACE_ME-efs-id": fs,
              "REPLACE_ME-bucket": args.bucket}  # fmt: skip
    text = fill(t.text, values)
    left = sorted(set(PLACEHOLDER.findall(text)))
    if left:
        raise SetupError(f"{t.path.name} has placeholders this script does not fill: {left}")
    types = yaml.safe_load(text)["available_node_types"].values()
    named = {c["node_config"]["IamInstanceProfile"]["Arn"] for c in types}
    if not named <= set(arns.values()):
        raise SetupError(f"{t.path.name} names instance profiles {sorted(named)}, "
                         f"but AWS made {sorted(arns.values())}")  # fmt: skip
    dry_run(ec2, t, values, next(iter(subnets.values())))
    out.write_text(text)

    zones = ", ".join(f"{s} ({z})" for z, s in subnets.items())
    print(f"account         {account}, region {t.region}, default VPC {vpc}")
    print(f"subnets         {zones}")
    print(f"security group  {group}: SSH from {cidr}, any traffic between its members")
    print(f"head profile    {arns['head']}")
    print(f"worker profile  {arns['worker']}")
    print(f"EFS             {fs}, a mount target in each subnet above")
    print(f"bucket          s3://{args.bucket} ({kept})")
    print(f"AMI             {ami}" + (f" (from {args.ami})" if args.ami.startswith("/") else ""))
    print(f"dry run         EC2 would launch {', '.join(t.node_configs)}")
    print(f"wrote {out}: check it, then `ray up -y {out}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python cluster/aws_setup.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "--ssh-cidr", required=True,
        help="the one address range SSH is admitted from: your address, e.g. "
        '"$(curl -s https://checkip.amazonaws.com)/32"; none wider than a /8 (IPv6: /32); a '
        "rerun with a new one replaces it",
    )  # fmt: skip
    parser.add_argument(
        "--bucket", required=True,
        help="the S3 bucket for MLflow's artifacts and sweep storage: a new, globally unique "
        "name (or a bucket of yours, which is used as it is), by S3's rules: 3 to 63 lowercase "
        "letters, digits, dots and hyphens",
    )  # fmt: skip
    parser.add_argument(
        "--ami", default=DLAMI,
        help="the AMI of every node: an image id (ami-...) or an SSM parameter that holds one "
        "(default: %(default)s, AWS's Deep Learning Base GPU AMI, whose driver runs CUDA 12.8)",
    )  # fmt: skip
    parser.add_argument(
        "--config", default=str(ROOT / "cluster.yaml"),
        help="the cluster YAML to fill in; its cluster_name, region and zones are used "
        "(default: the repository's cluster.yaml, which is left as it is)",
    )  # fmt: skip
    parser.add_argument(
        "--out", default="cluster-aws.yaml",
        help="where to write the filled-in copy, in a folder that exists; a file already "
        "filled in is never overwritten (default: %(default)s)",
    )  # fmt: skip
    return parser


def run(main, argv: list[str] | None, prog: str) -> int:
    """Runs a script's body; a user error or an AWS refusal becomes one line, exit 2."""
    try:
        return main(argv)
    except SetupError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    except NoCredentialsError:
        print(f"{prog}: error: no AWS credentials: run `aws configure` or set AWS_PROFILE",
              file=sys.stderr)  # fmt: skip
    except ClientError as e:
        print(f"{prog}: error: AWS refused: {e}", file=sys.stderr)
    except BotoCoreError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    return run(lambda a: setup(build_parser().parse_args(a)), argv, "aws_setup.py")


if __name__ == "__main__":
    sys.exit(main())
