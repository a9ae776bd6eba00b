// The browser client's crypto against docs/test-vectors.json (run: node --test web/tests/).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  RoomKeys, RoomSession, b64u, fromB64u, joinProof, messageAad, sealBytes, openBytes,
  paddedLength, PAD_BLOCK,
} from '../crypto.js';
import { sha256, PowSearch, stateBytes } from '../sha256.js';

const v = JSON.parse(readFileSync(new URL('../../docs/test-vectors.json', import.meta.url), 'utf8'));

test('key derivation matches the vectors', async () => {
  const keys = await RoomKeys.derive(fromB64u(v.secret));
  assert.equal(b64u(keys.roomId), v.room_id);
  assert.equal(b64u(keys.authKey), v.auth_key);
  assert.equal(b64u(await keys.msgKeyBytes(v.epoch)), v.msg_key);
  assert.equal(b64u(await keys.attachKey()), v.attach_key);
});

test('the join proof matches the vectors', async () => {
  const keys = await RoomKeys.derive(fromB64u(v.secret));
  const proof = await joinProof(keys.authKey, fromB64u(v.challenge), keys.roomId);
  assert.equal(b64u(proof), v.proof);
});

test('message encryption matches the vectors and is bound to room and epoch', async () => {
  const keys = await RoomKeys.derive(fromB64u(v.secret));
  const m = v.message;
  assert.equal(b64u(messageAad(keys.roomId, v.epoch)), m.aad);
  const ct = await sealBytes(keys, v.epoch, fromB64u(m.iv), new TextEncoder().encode(m.plaintext));
  assert.equal(b64u(ct), m.ct);
  const plain = await openBytes(keys, v.epoch, fromB64u(m.iv), fromB64u(m.ct));
  assert.equal(new TextDecoder().decode(plain), m.plaintext);
  assert.equal(await openBytes(keys, v.epoch + 1, fromB64u(m.iv), fromB64u(m.ct)), null);
});

test('proof-of-work hashing matches the vectors', () => {
  const keys = { roomId: fromB64u(v.room_id) };
  const token = fromB64u(v.pow.token);
  const search = new PowSearch(token, keys.roomId);
  assert.equal(b64u(stateBytes(search.hash(0))), v.pow.counter_0_hash);
  let c = 0;
  while (!search.check(c, v.pow.bits)) c += 1;
  assert.equal(c, v.pow.solution);
  assert.equal(b64u(stateBytes(search.hash(c))), v.pow.solution_hash);
  // Counters above 2^32 use the high word too.
  const big = 2 ** 40 + 5;
  const msg = new Uint8Array([...new TextEncoder().encode('nanochat/v1/pow'), ...token, ...keys.roomId,
    0, 0, 1, 0, 0, 0, 0, 5]);
  assert.equal(b64u(stateBytes(search.hash(big))), b64u(sha256(msg)));
});

test('the generic SHA-256 is right', () => {
  assert.equal(b64u(sha256(new TextEncoder().encode('abc'))), 'ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0');
});

test('sessions reject replays and foreign messages', async () => {
  const keys = await RoomKeys.derive(fromB64u(v.secret));
  const alice = new RoomSession(keys);
  const bob = new RoomSession(keys);
  const sealed = await alice.seal('alice', 'hi');
  const msg = { seq: 1, ts: 0, epoch: sealed.epoch, iv: sealed.iv, ct: sealed.ct };
  const got = await bob.open(msg);
  assert.equal(got.text, 'hi');
  assert.equal(got.own, false);
  assert.equal(await bob.open(msg), null, 'same (sid, n) again');
  const other = new RoomSession(await RoomKeys.derive(new Uint8Array(32)));
  assert.equal(await other.open(msg), null, 'another room cannot read it');
  assert.equal(bob.rejected, 1);
  assert.equal(other.rejected, 1);
});

test('history paged in backwards passes the replay rule; a reordered counter does not', async () => {
  const keys = await RoomKeys.derive(fromB64u(v.secret));
  const alice = new RoomSession(keys);
  const sealed = [];
  for (let i = 0; i < 4; i++) sealed.push(await alice.seal('alice', `m${i}`));
  const msg = (i, seq) => ({ seq, ts: 0, epoch: sealed[i].epoch, iv: sealed[i].iv, ct: sealed[i].ct });
  const bob = new RoomSession(keys);
  assert.ok(await bob.open(msg(2, 30)));
  assert.ok(await bob.open(msg(3, 40)));
  assert.ok(await bob.open(msg(0, 10)), 'older page');
  assert.ok(await bob.open(msg(1, 20)));
  const carol = new RoomSession(keys);
  assert.ok(await carol.open(msg(2, 10)));
  assert.equal(await carol.open(msg(1, 20)), null, 'a lower n at a higher seq is a replay');
});

test('a sealed message is padded to whole blocks within the server\'s limit and opens as written', async () => {
  const keys = await RoomKeys.derive(fromB64u(v.secret));
  const s = new RoomSession(keys);
  const reader = new RoomSession(keys);
  const now = 1764028800000;
  let seq = 0;
  const lengths = new Map();
  for (const text of ['', 'hi', 'x'.repeat(100), 'quotes " and \\ and\nnew lines', 'é漢字🙂'.repeat(100),
    'y'.repeat(8080), 'x'.repeat(9000)]) {
    const least = s.sealedLength('nick "n"', text, now);
    const sealed = await s.seal('nick "n"', text, now, 8192);
    const length = fromB64u(sealed.ct).length;
    lengths.set(text, length);
    assert.equal(length, paddedLength(least - 16, 8192) + 16, text.slice(0, 20));
    // Padding never makes a message that fits too long, nor shortens one that does not.
    assert.ok(least <= 8192 ? length <= 8192 : length === least, text.slice(0, 20));
    const opened = await reader.open({ seq: (seq += 1), ts: now, ...sealed });
    assert.equal(opened?.text, text);
  }
  // Short messages all look alike to the server: one block and the tag.
  for (const text of ['', 'hi', 'x'.repeat(100)]) assert.equal(lengths.get(text), PAD_BLOCK + 16);
  assert.equal(lengths.get('y'.repeat(8080)), 8192);
});

test("an earlier session's messages count as one's own once adopted, and only then", async () => {
  const keys = await RoomKeys.derive(fromB64u(v.secret));
  const before = new RoomSession(keys);
  const sealed = await before.seal('me', 'from before the reload');
  const msg = { seq: 1, ts: 0, epoch: sealed.epoch, iv: sealed.iv, ct: sealed.ct };
  const stranger = new RoomSession(keys);
  assert.equal((await stranger.open(msg)).own, false);
  const after = new RoomSession(keys);
  after.adopt([before.sid, 42]);
  assert.equal((await after.open(msg)).own, true);
  assert.notEqual(after.sid, before.sid, 'the new session still has its own sid');
});

test('forgetting old messages keeps the replay rule for what is left and lets them back in', async () => {
  const keys = await RoomKeys.derive(fromB64u(v.secret));
  const alice = new RoomSession(keys);
  const sealed = [];
  for (let i = 0; i < 6; i++) sealed.push(await alice.seal('alice', `m${i}`));
  const msg = (i, seq) => ({ seq, ts: 0, epoch: sealed[i].epoch, iv: sealed[i].iv, ct: sealed[i].ct });
  const bob = new RoomSession(keys);
  for (let i = 0; i < 4; i++) assert.ok(await bob.open(msg(i, 10 * (i + 1))));
  bob.forgetBefore(35);
  assert.deepEqual(bob.bySid.get(alice.sid), [{ seq: 40, n: 4 }]);
  bob.forgetBefore(100);
  assert.deepEqual(bob.bySid.get(alice.sid), [{ seq: 40, n: 4 }], "a sid's latest stays");
  assert.equal(await bob.open(msg(1, 50)), null, 'an older counter at a newer seq is still a replay');
  assert.equal(await bob.open(msg(3, 60)), null, 'so is the latest one again');
  assert.ok(await bob.open(msg(1, 20)), 'a forgotten message paged back in');
  assert.ok(await bob.open(msg(4, 70)), 'the next one live');

  // Anyone with the link can invent a sid per message: only the most recent ones are kept.
  const carol = new RoomSession(keys);
  const forged = [];
  for (let i = 0; i < 5; i++) forged.push(new RoomSession(keys));
  let seq = 100;
  for (const s of forged) assert.ok(await carol.open({ seq: seq += 1, ts: 0, ...(await s.seal('x', 'y')) }));
  carol.forgetBefore(0, 3);
  assert.deepEqual([...carol.bySid.keys()].sort(), forged.slice(2).map((s) => s.sid).sort());
});
