// NanoChat's service worker, registered only while this device has notifications turned on.
// Some browsers show a notification only from a service worker (Chrome on Android); this one
// lets the page show its "N new messages" there, and brings the tab it came from to the front
// when it is clicked. It handles no fetch: nothing is cached, served or kept by it.
'use strict';

/** How long a tab has to say that a notification is its own. */
const ASK_MS = 1000;

self.addEventListener('install', () => self.skipWaiting());

/** Whether the tab `client` is the one whose token is `tab`: it answers on a channel of its own. */
function isTab(client, tab) {
  return new Promise((resolve) => {
    const channel = new MessageChannel();
    const timer = setTimeout(() => resolve(false), ASK_MS);
    channel.port1.onmessage = (e) => {
      clearTimeout(timer);
      resolve(e.data === true);
    };
    client.postMessage({ nanochatTab: tab }, [channel.port2]);
  });
}

/**
 * The open tab that showed the notification with token `tab`; if none says so (closed, or
 * frozen by the browser), the tab of this site used last; none if no tab is open.
 */
async function tabOf(tab) {
  const tabs = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
  const answers = await Promise.all(tabs.map((client) => isTab(client, tab)));
  return tabs[answers.indexOf(true)] ?? tabs[0] ?? null;
}

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  event.waitUntil(tabOf(event.notification.data?.tab)
    .then((client) => client?.focus())
    .catch(() => {}));
});
