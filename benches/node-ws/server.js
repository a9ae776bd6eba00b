// Fan-out baseline: a plain Node.js broadcast server on the `ws` package that answers just
// enough of protocol v1 for nanochat-load (hello, create/join -> joined, send -> ack + msg to
// the other members). No authentication, validation, limits or storage, like bare-broadcast.
//
// Usage: node server.js 127.0.0.1:0   -- prints `listening on <addr>`, serves until killed.
'use strict';

const { WebSocketServer } = require('ws');

const [host, port] = (process.argv[2] || '127.0.0.1:0').split(':');
const rooms = new Map(); // room id -> { seq, members: Set<WebSocket> }
const HELLO = JSON.stringify({
  type: 'hello', v: 1, challenge: 'A'.repeat(43), pow_bits: 0, max_ct: 8192, history: 100,
});

const wss = new WebSocketServer({ host, port: Number(port), path: '/ws', perMessageDeflate: false });

wss.on('listening', () => {
  const a = wss.address();
  console.log(`listening on ${a.address}:${a.port}`);
});

wss.on('connection', (socket) => {
  let room = null;
  socket.send(HELLO);
  socket.on('message', (data) => {
    let frame;
    try {
      frame = JSON.parse(data);
    } catch {
      return;
    }
    if (frame.type === 'create' || frame.type === 'join') {
      const id = String(frame.room);
      if (!rooms.has(id)) rooms.set(id, { seq: 0, members: new Set() });
      room = rooms.get(id);
      room.members.add(socket);
      socket.send(JSON.stringify({ type: 'joined', room: id, messages: [], more: false }));
    } else if (frame.type === 'send' && room) {
      room.seq += 1;
      const msg = JSON.stringify({
        type: 'msg', seq: room.seq, ts: 0, epoch: frame.epoch, iv: frame.iv, ct: frame.ct,
      });
      for (const member of room.members) {
        if (member !== socket) member.send(msg);
      }
      socket.send(JSON.stringify({ type: 'ack', ref: frame.ref, seq: room.seq, ts: 0 }));
    }
  });
  socket.on('close', () => {
    if (room) room.members.delete(socket);
  });
});
