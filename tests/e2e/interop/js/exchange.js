// An independent ISO 8583 peer: the iso_8583 npm library in its default format (2-byte length
// header, binary bitmap), on a real socket. Reads {"port": N, "messages": [{field: value}]}
// on stdin, sends the messages one at a time, each after the previous answer, and prints the
// decoded answers as a JSON list. Bounded: gives up after 10 s.
'use strict';
const net = require('net');
const Iso = require('iso_8583');

function main(input) {
  const { port, messages } = JSON.parse(input);
  const answers = [];
  let buffered = Buffer.alloc(0);
  const socket = net.connect({ host: '127.0.0.1', port });
  const timer = setTimeout(() => fail('no answer within 10 s'), 10000);

  function fail(why) {
    process.stderr.write(`exchange.js: ${why}\n`);
    socket.destroy();
    process.exit(1);
  }

  function sendNext() {
    if (answers.length === messages.length) {
      clearTimeout(timer);
      socket.end();
      process.stdout.write(JSON.stringify(answers) + '\n');
      return;
    }
    const frame = new Iso(messages[answers.length]).getBufferMessage();
    if (frame.error) fail(`cannot encode: ${frame.error}`);
    socket.write(frame);
  }

  socket.on('connect', sendNext);
  socket.on('error', (error) => fail(String(error)));
  socket.on('close', () => {
    if (answers.length < messages.length) fail('link closed by the processor');
  });
  socket.on('data', (data) => {
    buffered = Buffer.concat([buffered, data]);
    while (buffered.length >= 2) {
      const length = buffered.readUInt16BE(0);
      if (buffered.length < 2 + length) break;
      const frame = buffered.subarray(0, 2 + length);
      buffered = buffered.subarray(2 + length);
      const decoded = new Iso().getIsoJSON(frame, {});
      if (decoded.error) fail(`cannot decode an answer: ${decoded.error}`);
      answers.push(decoded);
      sendNext();
    }
  });
}

let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => main(input));
