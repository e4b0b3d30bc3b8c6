"""Delete what cluster/aws_setup.py created, after `ray down`: nothing else.

It finds the security group, the EFS file system and its mount targets, the bucket, and
the two roles and instance profiles by their tags (ray-cluster-name=<cluster_name> and
created-by=cluster/aws_setup.py), lists them, and deletes them with --yes. The bucket's
objects and everything on EFS (the activation cache, Tune's results, the SAEs) go with
them. It refuses while any instance of the cluster exists: run `ray down` first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import boto3
from aws_setup import SetupError, Template, code, ours, run, tags, wait
from botocore.exceptions import ClientError


def instances(ec2, cluster: str, states: list[str]) -> list[str]:
    """The cluster's instances in these states (Ray tags each with the cluster's name)."""
    found = ec2.describe_instances(Filters=[
        {"Name": "tag:ray-cluster-name", "Values": [cluster]},
        {"Name": "instance-state-name", "Values": states},
    ])["Reservations"]  # fmt: skip
    return [i["InstanceId"] for r in found for i in r["Instances"]]


def found(session, t: Template) -> dict[str, list]:
    """What the setup made, found by its tags."""
    ec2, efs, s3, iam = (session.client(s) for s in ("ec2", "efs", "s3", "iam"))
    groups = ec2.describe_security_groups(Filters=[
        {"Name": f"tag:{k['Key']}", "Values": [k["Value"]]} for k in tags(t.cluster)
    ])["SecurityGroups"]  # fmt: skip
    systems = [
        f for page in efs.get_paginator("describe_file_systems").paginate()
        for f in page["FileSystems"] if ours(f.get("Tags"), t.cluster)
    ]  # fmt: skip
    buckets = []
    for b in s3.list_buckets()["Buckets"]:
        try:
            if ours(s3.get_bucket_tagging(Bucket=b["Name"])["TagSet"], t.cluster):
                buckets.append(b["Name"])
        except ClientError:  # untagged, or in another region
            continue
    roles, profiles = [], []
    for name in (t.head_profile, t.worker_profile):
        try:
            if ours(iam.list_role_tags(RoleName=name)["Tags"], t.cluster):
                roles.append(name)
        except ClientError as e:
            if code(e) != "NoSuchEntity":
                raise
        try:
            profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
            if ours(profile.get("Tags"), t.cluster):
                profiles.append(name)
        except ClientError as e:
            if code(e) != "NoSuchEntity":
                raise
    return {"security group": [g["GroupId"] for g in groups],
            "EFS": [f["FileSystemId"] for f in systems], "bucket": buckets,
            "instance profile": profiles, "IAM role": roles}  # fmt: skip


def delete(session, what: dict[str, list]) -> None:
    ec2, efs, s3, iam = (session.client(s) for s in ("ec2", "efs", "s3", "iam"))
    for name in what["bucket"]:
        # Every version and delete marker, so that the bucket is empty even if versioned.
        for page in s3.get_paginator("list_object_versions").paginate(Bucket=name):
            versions = page.get("Versions", []) + page.get("DeleteMarkers", [])
            doomed = [{"Key": o["Key"], "VersionId": o["VersionId"]} for o in versions]
            if doomed:
                s3.delete_objects(Bucket=name, Delete={"Objects": doomed, "Quiet": True})
        s3.delete_bucket(Bucket=name)
        print(f"deleted bucket {name}")
    for fs in what["EFS"]:
        for target in efs.describe_mount_targets(FileSystemId=fs)["MountTargets"]:
            efs.delete_mount_target(MountTargetId=target["MountTargetId"])
        # A file system with mount targets cannot be deleted.
        wait(lambda fs=fs: not efs.describe_mount_targets(FileSystemId=fs)["MountTargets"],
             f"the mount targets of {fs} to go")  # fmt: skip
        efs.delete_file_system(FileSystemId=fs)
        print(f"deleted EFS {fs} and its mount targets")
    for group in what["security group"]:

        def deleted(group=group) -> bool:
            try:
                ec2.delete_security_group(GroupId=group)
            except ClientError as e:
                # The mount targets' network interfaces take a while to be released.
                if code(e) == "DependencyViolation":
                    return False
                raise
            return True

        wait(deleted, f"security group {group} to be free of network interfaces")
        print(f"deleted security group {group}")
    for name in what["instance profile"]:
        for role in iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]:
            iam.remove_role_from_instance_profile(InstanceProfileName=name,
                                                  RoleName=role["RoleName"])  # fmt: skip
        iam.delete_instance_profile(InstanceProfileName=name)
        print(f"deleted instance profile {name}")
    for name in what["IAM role"]:
        for policy in iam.list_role_policies(RoleName=name)["PolicyNames"]:
            iam.delete_role_policy(RoleName=name, PolicyName=policy)
        for profile in iam.list_instance_profiles_for_role(RoleName=name)["InstanceProfiles"]:
            iam.remove_role_from_instance_profile(
                InstanceProfileName=profile["InstanceProfileName"], RoleName=name
            )
        iam.delete_role(RoleName=name)
        print(f"deleted IAM role {name}")


def teardown(args: argparse.Namespace) -> int:
    t = Template(Path(args.config))
    session = boto3.Session(region_name=t.region)
    ec2 = session.client("ec2")
    left = instances(ec2, t.cluster, ["pending", "running", "stopping", "stopped"])
    if left:
        raise SetupError(f"cluster {t.cluster} still has instances {', '.join(left)}: "
                         f"run `ray down -y {args.config}` first")  # fmt: skip
    # Right after `ray down` its nodes may still be shutting down, holding the group.
    wait(lambda: not instances(ec2, t.cluster, ["shutting-down"]), "the nodes to terminate")
    what = found(session, t)
    for kind, ids in what.items():
        print(f"{kind + ':':18}{', '.join(ids) or '-'}")
    if not args.yes:
        print("nothing deleted: rerun with --yes to delete the above, data included")
        return 0
    delete(session, what)
    key = f"ray-autoscaler_{t.region}"
    print(f"`ray up` made the key pair {key}, which this leaves (other clusters may use it): "
          f"`aws ec2 delete-key-pair --region {t.region} --key-name {key}` deletes it")  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python cluster/aws_teardown.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument(
        "--config", default="cluster-aws.yaml",
        help="the cluster YAML whose resources to delete: its cluster_name, region and "
        "instance profile names are used (default: %(default)s, what aws_setup.py wrote; "
        "cluster.yaml names the same)",
    )  # fmt: skip
    parser.add_argument(
        "--yes", action="store_true",
        help="delete what was found; without it, only list it",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    return run(lambda a: teardown(build_parser().parse_args(a)), argv, "aws_teardown.py")


if __name__ == "__main__":
    sys.exit(main())
