// NanoChat protocol v1, client side: key derivation (HKDF), the join proof (HMAC), message
// encryption (AES-256-GCM) and the replay rule, all with WebCrypto. See docs/protocol.md.

const enc = new TextEncoder();
const dec = new TextDecoder();
const subtle = globalThis.crypto.subtle;

export const EPOCH_MS = 86_400_000;

/** base64url without padding. */
export function b64u(bytes) {
  let bin = '';
  for (const b of bytes) bin += String.fromCharCode(b);
  return btoa(bin).replaceAll('+', '-').replaceAll('/', '_').replace(/=+$/, '');
}

/** Decode base64url without padding; throws on anything else. */
export function fromB64u(text) {
  if (typeof text !== 'string' || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
    throw new Error('not base64url');
  }
  const bin = atob(text.replaceAll('-', '+').replaceAll('_', '/'));
  return Uint8Array.from(bin, (c) => c.charCodeAt(0));
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

export function u32be(x) {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, x);
  return b;
}

export function epochOf(ms) {
  return Math.floor(ms / EPOCH_MS);
}

export function randomBytes(n) {
  return globalThis.crypto.getRandomValues(new Uint8Array(n));
}

async function hkdf(secret, info, length) {
  const key = await subtle.importKey('raw', secret, 'HKDF', false, ['deriveBits']);
  const bits = await subtle.deriveBits(
    {
      name: 'HKDF',
      hash: 'SHA-256',
      salt: new Uint8Array(0),
      info: typeof info === 'string' ? enc.encode(info) : info,
    },
    key,
    length * 8,
  );
  return new Uint8Array(bits);
}

/** Everything a client derives from a room secret. */
export class RoomKeys {
  static async derive(secret) {
    const k = new RoomKeys();
    k.secret = secret;
    k.roomId = await hkdf(secret, 'nanochat/v1/room-id', 16);
    k.authKey = await hkdf(secret, 'nanochat/v1/auth', 32);
    k.msgKeys = new Map();
    return k;
  }

  /** Raw bytes of msg_key(epoch). */
  async msgKeyBytes(epoch) {
    return hkdf(this.secret, concat(enc.encode('nanochat/v1/msg/'), u32be(epoch)), 32);
  }

  async msgKey(epoch) {
    if (!this.msgKeys.has(epoch)) {
      const raw = await this.msgKeyBytes(epoch);
      this.msgKeys.set(epoch, await subtle.importKey('raw', raw, 'AES-GCM', false, ['encrypt', 'decrypt']));
      // Keys of epochs far from today are not needed any more.
      for (const e of this.msgKeys.keys()) if (Math.abs(e - epoch) > 40) this.msgKeys.delete(e);
    }
    return this.msgKeys.get(epoch);
  }

  async attachKey() {
    return hkdf(this.secret, 'nanochat/v1/attach', 32);
  }
}

export function messageAad(roomId, epoch) {
  return concat(enc.encode('nanochat/v1/msg'), roomId, u32be(epoch));
}

/** HMAC-SHA256(auth_key, "nanochat/v1/join" || challenge || room_id). */
export async function joinProof(authKey, challenge, roomId) {
  const key = await subtle.importKey('raw', authKey, { name: 'HMAC', hash: 'SHA-256' }, false, ['sign']);
  const sig = await subtle.sign('HMAC', key, concat(enc.encode('nanochat/v1/join'), challenge, roomId));
  return new Uint8Array(sig);
}

/** Encrypt bytes with msg_key(epoch); returns the ciphertext with its tag. */
export async function sealBytes(keys, epoch, iv, plaintext) {
  const ct = await subtle.encrypt(
    { name: 'AES-GCM', iv, additionalData: messageAad(keys.roomId, epoch) },
    await keys.msgKey(epoch),
    plaintext,
  );
  return new Uint8Array(ct);
}

/** Decrypt; null when it does not authenticate. */
export async function openBytes(keys, epoch, iv, ct) {
  try {
    const plain = await subtle.decrypt(
      { name: 'AES-GCM', iv, additionalData: messageAad(keys.roomId, epoch) },
      await keys.msgKey(epoch),
      ct,
    );
    return new Uint8Array(plain);
  } catch {
    return null;
  }
}

/**
 * One client session in one room: its sid and counter, and what it has seen.
 *
 * The replay rule: a (sid, n) is accepted once, and within one sid, n must grow with seq. Live
 * messages arrive in ascending seq, so "n above the highest seen" is the usual case; checking
 * against the neighbours by seq keeps the same rule when older history is paged in backwards.
 */
/** The most senders' sessions a RoomSession keeps counters for once it forgets old messages. */
export const MAX_SIDS = 10_000;

/** Envelopes are padded to a multiple of this many bytes. */
export const PAD_BLOCK = 256;

/**
 * The length an envelope of `length` bytes is padded to (with JSON whitespace after it), so
 * that the server and the network learn a message's length only to within PAD_BLOCK bytes: the
 * next multiple of PAD_BLOCK, never past what a server taking `maxCt` bytes of ciphertext
 * accepts (the tag takes 16), never shorter than the envelope.
 */
export function paddedLength(length, maxCt) {
  const whole = Math.ceil(length / PAD_BLOCK) * PAD_BLOCK;
  return Math.max(length, Math.min(whole, maxCt - 16));
}

export class RoomSession {
  constructor(keys) {
    this.keys = keys;
    this.sid = b64u(randomBytes(8));
    this.n = 0;
    this.bySid = new Map(); // sid -> [{ seq, n }] sorted by seq
    this.rejected = 0;
    this.mine = new Set([this.sid]); // this session's sid and those of this device's earlier ones
  }

  /** Count messages of these earlier sessions (sids) as this device's own. */
  adopt(sids) {
    for (const sid of sids) if (typeof sid === 'string') this.mine.add(sid);
  }

  /** Encrypt a text as a send frame's fields, padded within a server's largest ciphertext. */
  async seal(nick, text, now = Date.now(), maxCt = 8192) {
    this.n += 1;
    const envelope = { nick, text, sid: this.sid, n: this.n, ts: now };
    const epoch = epochOf(now);
    const iv = randomBytes(12);
    const json = enc.encode(JSON.stringify(envelope));
    // JSON allows whitespace after the value: every reader parses it as the same envelope.
    const plain = new Uint8Array(paddedLength(json.length, maxCt)).fill(0x20);
    plain.set(json);
    const ct = await sealBytes(this.keys, epoch, iv, plain);
    return { epoch, iv: b64u(iv), ct: b64u(ct), envelope };
  }

  /** The ciphertext's least length in bytes if `seal(nick, text)` ran now (its tag included,
   * its padding not: padding never takes it past the server's limit). */
  sealedLength(nick, text, now = Date.now()) {
    const envelope = { nick, text, sid: this.sid, n: this.n + 1, ts: now };
    return enc.encode(JSON.stringify(envelope)).length + 16;
  }

  /** Decrypt a Msg and apply the replay rule; null (and counted) when rejected. */
  async open(msg) {
    let plain = null;
    try {
      plain = await openBytes(this.keys, msg.epoch, fromB64u(msg.iv), fromB64u(msg.ct));
    } catch {
      plain = null;
    }
    let env = null;
    if (plain) {
      try {
        env = JSON.parse(dec.decode(plain));
      } catch {
        env = null;
      }
    }
    const valid = env && typeof env.nick === 'string' && typeof env.text === 'string'
      && typeof env.sid === 'string' && Number.isSafeInteger(env.n) && env.n >= 1;
    if (!valid || !this.accept(env.sid, env.n, msg.seq)) {
      this.rejected += 1;
      return null;
    }
    return { ...env, nick: env.nick.slice(0, 64), own: this.mine.has(env.sid) };
  }

  /**
   * Forget the messages below `seq` (the page no longer shows them), keeping each sid's latest:
   * a replayed older counter is still refused, and forgotten messages pass again if paged back
   * in. At most `maxSids` sids are kept (anyone with the link can invent a new one per message);
   * those heard from least recently go first.
   */
  forgetBefore(seq, maxSids = MAX_SIDS) {
    for (const list of this.bySid.values()) {
      let i = list.findIndex((e) => e.seq >= seq);
      if (i === -1) i = list.length - 1;
      if (i > 0) list.splice(0, i);
    }
    if (this.bySid.size > maxSids) {
      const latest = [...this.bySid].map(([sid, list]) => [list[list.length - 1].seq, sid]);
      latest.sort((a, b) => a[0] - b[0]);
      for (const [, sid] of latest.slice(0, this.bySid.size - maxSids)) this.bySid.delete(sid);
    }
  }

  accept(sid, n, seq) {
    const list = this.bySid.get(sid) ?? [];
    if (list.some((e) => e.n === n)) return false;
    let i = list.findIndex((e) => e.seq > seq);
    if (i === -1) i = list.length;
    if (i > 0 && list[i - 1].n >= n) return false;
    if (i < list.length && list[i].n <= n) return false;
    list.splice(i, 0, { seq, n });
    this.bySid.set(sid, list);
    return true;
  }
}
