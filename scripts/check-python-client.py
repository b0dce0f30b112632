#!/usr/bin/env python3
"""Runs the official Apache RocketMQ Python client against a running ferrumq broker.

    pip install rocketmq-python-client==5.1.2
    scripts/check-python-client.py [host:port]        (default 127.0.0.1:8081)

A producer sends 20 messages with a tag, keys and a property; a SimpleConsumer and a
PushConsumer (QueryAssignment, auto-renewed receives, body digest check, delivery timestamp)
must each get all 20, once. Exits non-zero on any difference.
"""
import sys
import threading
import time

from rocketmq import (ClientConfiguration, ConsumeResult, Credentials, FilterExpression,
                      Message, MessageListener, Producer, PushConsumer, SimpleConsumer)

endpoint = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:8081"
config = ClientConfiguration(endpoint, Credentials())
topic = "py-check-%d" % int(time.time())
count = 20

# The topic must exist before consumers subscribe; a producer's route query creates it.
producer = Producer(config, (topic,))
producer.startup()

simple = SimpleConsumer(config, "py-simple", {topic: FilterExpression("py")}, await_duration=3)
simple.startup()


class Collect(MessageListener):
    def __init__(self):
        self.ids = []
        self.lock = threading.Lock()

    def consume(self, message):
        with self.lock:
            self.ids.append(message.message_id)
        return ConsumeResult.SUCCESS


listener = Collect()
push = PushConsumer(config, "py-push", listener, {topic: FilterExpression("*")})
push.startup()
time.sleep(1)

sent = set()
for i in range(count):
    message = Message()
    message.topic = topic
    # "m21" has a CRC32 with a leading zero digit, which a digest must keep.
    message.body = b"m21" if i == 0 else ("python %d" % i).encode()
    message.tag = "py"
    message.keys = "key-%d" % i
    message.add_property("n", str(i))
    sent.add(producer.send(message).message_id)

received = []
deadline = time.time() + 30
while len(received) < count and time.time() < deadline:
    for message in simple.receive(32, 15):
        assert message.tag == "py", message.tag
        assert not message.corrupted, "body digest mismatch for %s" % message.message_id
        received.append(message.message_id)
        simple.ack(message)

deadline = time.time() + 30
while len(listener.ids) < count and time.time() < deadline:
    time.sleep(0.2)
time.sleep(2)  # anything delivered twice would show up now

failures = []
if sorted(received) != sorted(sent):
    failures.append("simple consumer got %d of %d (%d distinct)" % (len(received), count, len(set(received))))
if sorted(listener.ids) != sorted(sent):
    failures.append("push consumer got %d of %d (%d distinct)" % (len(listener.ids), count, len(set(listener.ids))))
for client in (push, simple, producer):
    client.shutdown()
if failures:
    print("FAILED: " + "; ".join(failures))
    sys.exit(1)
print("python client OK: %d sent, simple consumer and push consumer each received all, once" % count)
