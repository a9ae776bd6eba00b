// Web Worker that solves a proof-of-work token. Message in: {token, roomId, bits} (byte arrays).
// Messages out: {progress: hashesSoFar, rate: hashesPerSecond} now and then, then {counter}.
// The page cancels by terminating the worker.
import { PowSearch } from './sha256.js';

self.onmessage = (event) => {
  const { token, roomId, bits } = event.data;
  const search = new PowSearch(token, roomId);
  const started = performance.now();
  const CHUNK = 20000;
  for (let c = 0; c < 2 ** 53; c += 1) {
    if (search.check(c, bits)) {
      self.postMessage({ counter: c, hashes: c + 1, ms: performance.now() - started });
      return;
    }
    // A first report early, so even a short search shows movement; then every CHUNK hashes.
    if (c % CHUNK === CHUNK - 1 || c === 999) {
      const ms = performance.now() - started;
      self.postMessage({ progress: c + 1, rate: ((c + 1) * 1000) / Math.max(ms, 1) });
    }
  }
};
