"""For scripts/bench.py (the demo and the tests use tests/it/common): start the project's
emulator (tests/emulator/emulator.py) on 127.0.0.1 the way the tests do (a port the kernel
picks, written to a file; the health check answered by our own child) and create the AWS
resources a benchmark needs."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACCOUNT = "123456789012"
REGION = "us-east-1"
LAUNCH = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATE = "autoscaling:EC2_INSTANCE_TERMINATING"


class Emulator:
    def __init__(self, log_path):
        port_file = log_path + ".port"
        if os.path.exists(port_file):
            os.remove(port_file)
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "tests/emulator/emulator.py"), "-H", "127.0.0.1", "-p", "0",
             "--port-file", port_file],
            stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL, env=dict(os.environ))
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"emulator exited; see {log_path}")
            if time.time() > deadline:
                self.stop()
                raise SystemExit(f"emulator did not start; see {log_path}")
            if os.path.exists(port_file):
                self.port = int(open(port_file).read())
                self.endpoint = f"http://127.0.0.1:{self.port}"
                try:
                    health = self.control("GET", "/_emulator/health")
                except OSError:
                    health = None
                if health is not None:
                    if health.get("pid") != self.proc.pid:
                        self.stop()
                        raise SystemExit(f"port {self.port} answered from another process: {health}")
                    break
            time.sleep(0.1)
        session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION)
        cfg = boto3.session.Config(retries={"total_max_attempts": 3})
        self.sqs = session.client("sqs", endpoint_url=self.endpoint, config=cfg)
        self.sns = session.client("sns", endpoint_url=self.endpoint, config=cfg)
        self.asg = session.client("autoscaling", endpoint_url=self.endpoint, config=cfg)
        self.ec2 = session.client("ec2", endpoint_url=self.endpoint, config=cfg)
        self.dynamodb = session.client("dynamodb", endpoint_url=self.endpoint, config=cfg)

    def env(self):
        """Environment for the provision binary: every AWS call goes to this emulator."""
        return {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": REGION,
            "AWS_CONFIG_FILE": "/dev/null",
            "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
            "AWS_EC2_METADATA_DISABLED": "true",
            **{k: v for k, v in os.environ.items() if k in ("MALLOC_ARENA_MAX", "RUST_LOG")},
        }

    def control(self, method, path, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.endpoint + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"null")

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    # --- resources -------------------------------------------------------------------
    def queue(self, name):
        url = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        return url, f"arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"

    def topic_with_queue(self, name):
        arn = self.sns.create_topic(Name=name)["TopicArn"]
        url, qarn = self.queue(name + "-sub")
        self.sns.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=qarn)
        return arn, url

    def group(self, name, max_size=1000, vpc_cidr="10.200.0.0/16", subnet_cidr="10.200.0.0/20"):
        # A /20 subnet by default: room for a few thousand instances (a /24 runs out at ~250).
        # Instances get addresses from .4 upwards (simulated hosts are started at those).
        vpc = self.ec2.create_vpc(CidrBlock=vpc_cidr)["Vpc"]["VpcId"]
        subnet = self.ec2.create_subnet(VpcId=vpc, CidrBlock=subnet_cidr,
                                        AvailabilityZone=REGION + "a")["Subnet"]["SubnetId"]
        image = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        self.ec2.create_launch_template(LaunchTemplateName=name + "-lt",
                                        LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"})
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=name, LaunchTemplate={"LaunchTemplateName": name + "-lt"},
            MinSize=0, MaxSize=max_size, DesiredCapacity=0, VPCZoneIdentifier=subnet)

    def hook(self, group, name, transition, target_arn, heartbeat=300, metadata=None):
        kw = dict(AutoScalingGroupName=group, LifecycleHookName=name, LifecycleTransition=transition,
                  HeartbeatTimeout=heartbeat, DefaultResult="ABANDON",
                  NotificationTargetARN=target_arn, RoleARN=f"arn:aws:iam::{ACCOUNT}:role/asg-notify")
        if metadata:
            kw["NotificationMetadata"] = json.dumps(metadata)
        self.asg.put_lifecycle_hook(**kw)

    def claims_table(self, name):
        """The claims table as config/cloudformation.yaml makes it."""
        db = self.dynamodb
        db.create_table(TableName=name, BillingMode="PAY_PER_REQUEST",
                        AttributeDefinitions=[{"AttributeName": "token", "AttributeType": "S"}],
                        KeySchema=[{"AttributeName": "token", "KeyType": "HASH"}])
        db.update_time_to_live(TableName=name, TimeToLiveSpecification={"AttributeName": "expires_at",
                                                                        "Enabled": True})

    def instances(self, group):
        g = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
        return {i["InstanceId"]: i["LifecycleState"] for i in (g[0]["Instances"] if g else [])}

    def tags(self, instance_id):
        r = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"]
        return {t["Key"]: t["Value"] for res in r for i in res["Instances"] for t in i.get("Tags", [])}

    def queue_depth(self, url):
        a = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[
            "ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])

    def drain(self, url):
        out = []
        for _ in range(100):
            msgs = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
            if not msgs:
                break
            for m in msgs:
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
                out.append(m["Body"])
        return out


def write_config(path, queue_url, state_path, topic_arn=None, extra="", max_in_flight=32, wait_time="20s",
                 claims_table=None):
    notify = f'[notify]\ntopic_arn = "{topic_arn}"\n' if topic_arn else ""
    claims = f'claims_table = "{claims_table}"\n' if claims_table else ""
    with open(path, "w") as f:
        f.write(f'''[queue]
url = "{queue_url}"
max_in_flight = {max_in_flight}
wait_time = "{wait_time}"

{notify}
[state]
path = "{state_path}"
{claims}
[layers.web]
groups = ["web-*"]
on_failure = "abandon"
launch = [ {{ tag = {{ Name = "web-{{instance_id}}", Environment = "{{metadata.environment}}", Stack = "v{{metadata.major}} {{metadata.environment}} {{metadata.platform}}" }} }} ]
terminate = [ {{ tag = {{ Draining = "true" }} }} ]
{extra}
''')
