#!/usr/bin/env node
// Runs the official Apache RocketMQ Node.js client against a running ferrumq broker.
//
//   npm install rocketmq-client-nodejs@1.0.8
//   NODE_PATH=$PWD/node_modules node scripts/check-node-client.js [host:port]   (default 127.0.0.1:8081)
//
// A producer sends 20 messages; a SimpleConsumer must receive all 20 once, none marked
// corrupted (this client only ever names queue 0, and needs a body digest on every message:
// it reads CRC32 as a decimal number). Exits non-zero on any difference.
const { Producer, SimpleConsumer } = require('rocketmq-client-nodejs');

const endpoints = process.argv[2] || '127.0.0.1:8081';
const topic = `node-check-${Date.now()}`;
const count = 20;

async function main() {
  const producer = new Producer({ endpoints, namespace: '', topics: [topic] });
  await producer.startup();
  const consumer = new SimpleConsumer({
    endpoints,
    namespace: '',
    consumerGroup: 'node-simple',
    subscriptions: new Map().set(topic, 'node'),
    awaitDuration: 3000,
  });
  await consumer.startup();
  const sent = new Set();
  for (let i = 0; i < count; i++) {
    const receipt = await producer.send({ topic, tag: 'node', keys: [`key-${i}`], body: Buffer.from(i === 0 ? 'm21' : `node ${i}`) });
    sent.add(receipt.messageId);
  }
  const received = [];
  const deadline = Date.now() + 30000;
  while (received.length < count && Date.now() < deadline) {
    for (const message of await consumer.receive(32, 15000)) {
      if (message.corrupted) {
        console.log(`FAILED: body digest mismatch for ${message.messageId}`);
        process.exit(1);
      }
      received.push(message.messageId);
      await consumer.ack(message);
    }
  }
  await consumer.shutdown();
  await producer.shutdown();
  const distinct = new Set(received);
  if (received.length !== count || distinct.size !== count || [...sent].some((id) => !distinct.has(id))) {
    console.log(`FAILED: received ${received.length} of ${count} (${distinct.size} distinct)`);
    process.exit(1);
  }
  console.log(`node client OK: ${count} sent, simple consumer received all, once`);
  process.exit(0);
}

main().catch((e) => {
  console.log(`FAILED: ${e.stack || e}`);
  process.exit(1);
});
