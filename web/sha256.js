// A small, fast SHA-256 for proof of work: WebCrypto's digest() costs a promise per hash
// (about 0.1 M hashes/s), while this hashes a fixed prefix once and then spends one compression
// per candidate. Used by pow-worker.js and checked against the test vectors.

const K = new Int32Array([
  0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
  0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
  0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
  0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
  0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
  0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
  0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
  0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2,
]);
const IV = [0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a, 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19];

/** Compress one 64-byte block given as 16 big-endian words `w` (a 64-entry scratch array)
 *  into `state` (8 words), in place. */
export function compress(state, w) {
  for (let i = 16; i < 64; i++) {
    const a = w[i - 15];
    const b = w[i - 2];
    const s0 = ((a >>> 7) | (a << 25)) ^ ((a >>> 18) | (a << 14)) ^ (a >>> 3);
    const s1 = ((b >>> 17) | (b << 15)) ^ ((b >>> 19) | (b << 13)) ^ (b >>> 10);
    w[i] = (w[i - 16] + s0 + w[i - 7] + s1) | 0;
  }
  let a = state[0];
  let b = state[1];
  let c = state[2];
  let d = state[3];
  let e = state[4];
  let f = state[5];
  let g = state[6];
  let h = state[7];
  for (let i = 0; i < 64; i++) {
    const S1 = ((e >>> 6) | (e << 26)) ^ ((e >>> 11) | (e << 21)) ^ ((e >>> 25) | (e << 7));
    const ch = (e & f) ^ (~e & g);
    const t1 = (h + S1 + ch + K[i] + w[i]) | 0;
    const S0 = ((a >>> 2) | (a << 30)) ^ ((a >>> 13) | (a << 19)) ^ ((a >>> 22) | (a << 10));
    const maj = (a & b) ^ (a & c) ^ (b & c);
    h = g;
    g = f;
    f = e;
    e = (d + t1) | 0;
    d = c;
    c = b;
    b = a;
    a = (t1 + S0 + maj) | 0;
  }
  state[0] = (state[0] + a) | 0;
  state[1] = (state[1] + b) | 0;
  state[2] = (state[2] + c) | 0;
  state[3] = (state[3] + d) | 0;
  state[4] = (state[4] + e) | 0;
  state[5] = (state[5] + f) | 0;
  state[6] = (state[6] + g) | 0;
  state[7] = (state[7] + h) | 0;
}

/** SHA-256 of arbitrary bytes (for tests and small inputs). */
export function sha256(bytes) {
  const len = bytes.length;
  const total = Math.ceil((len + 9) / 64) * 64;
  const padded = new Uint8Array(total);
  padded.set(bytes);
  padded[len] = 0x80;
  const view = new DataView(padded.buffer);
  view.setUint32(total - 8, Math.floor((len * 8) / 2 ** 32));
  view.setUint32(total - 4, (len * 8) >>> 0);
  const state = Int32Array.from(IV);
  const w = new Int32Array(64);
  for (let off = 0; off < total; off += 64) {
    for (let i = 0; i < 16; i++) w[i] = view.getInt32(off + i * 4);
    compress(state, w);
  }
  const out = new Uint8Array(32);
  const ov = new DataView(out.buffer);
  for (let i = 0; i < 8; i++) ov.setInt32(i * 4, state[i]);
  return out;
}

/**
 * A proof-of-work searcher for SHA-256("nanochat/v1/pow" || token || room_id || u64be(c)):
 * 15 + 42 + 16 + 8 = 81 bytes, so the first 64 bytes are hashed once and each candidate costs
 * one compression of the second block.
 */
export class PowSearch {
  constructor(token, roomId) {
    const prefix = new Uint8Array(73);
    prefix.set(new TextEncoder().encode('nanochat/v1/pow'), 0);
    prefix.set(token, 15);
    prefix.set(roomId, 57);
    const view = new DataView(prefix.buffer);
    this.mid = Int32Array.from(IV);
    this.w = new Int32Array(64);
    for (let i = 0; i < 16; i++) this.w[i] = view.getInt32(i * 4);
    compress(this.mid, this.w);
    // Second block: prefix[64..73] (9 bytes), u64be(counter) (8), 0x80, zeros, length 648
    // bits. Only words 2-4 depend on the counter; the rest is fixed.
    this.w0 = view.getInt32(64);
    this.w1 = view.getInt32(68);
    this.byte8 = prefix[72];
    this.state = new Int32Array(8);
  }

  /** The state after hashing candidate `c` (valid until the next call). */
  hash(c) {
    const hi = Math.floor(c / 4294967296) >>> 0;
    const lo = c >>> 0;
    const w = this.w;
    w[0] = this.w0;
    w[1] = this.w1;
    w[2] = (this.byte8 << 24) | (hi >>> 8);
    w[3] = ((hi & 0xff) << 24) | (lo >>> 8);
    w[4] = ((lo & 0xff) << 24) | 0x800000;
    for (let i = 5; i < 15; i++) w[i] = 0;
    w[15] = 81 * 8;
    const state = this.state;
    state.set(this.mid);
    compress(state, w);
    return state;
  }

  /** Whether candidate `c` has at least `bits` leading zero bits. */
  check(c, bits) {
    const s = this.hash(c);
    if (bits <= 32) return bits === 0 || (s[0] >>> (32 - bits)) === 0;
    return s[0] === 0 && (bits >= 64 ? s[1] === 0 : (s[1] >>> (64 - bits)) === 0);
  }
}

/** Digest bytes of the state after `hash()`. */
export function stateBytes(state) {
  const out = new Uint8Array(32);
  const v = new DataView(out.buffer);
  for (let i = 0; i < 8; i++) v.setInt32(i * 4, state[i]);
  return out;
}
