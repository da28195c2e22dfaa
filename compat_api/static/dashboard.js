// Browser client of the legacy REST API (compat_api/openapi.json, docs/architecture.md). No build step, no dependencies.
// Every URL is relative to the page, so the dashboard also works behind a reverse proxy's path prefix.
"use strict";

(() => {
  const POLL_MS = 2000;
  const TIMEOUT_MS = 5000;
  const WANTED_HISTORY_SECONDS = 300;
  const MIN_CHART_SECONDS = 60;
  const TOP_CLIENTS = 10;
  const UNITS = ["B", "KB", "MB", "GB", "TB"];

  const $ = (id) => document.getElementById(id);
  let historySeconds = null; // the server's --history-seconds caps ?seconds=; read once from /openapi.json
  let lastHistory = [];

  /** "512 B", "12.3 KB", "123 KB", "1.2 MB" (1 KB = 1000 B); ``trim`` drops a trailing ".0". */
  function formatBytes(bytes, trim = false) {
    let value = bytes;
    let unit = 0;
    while (Math.abs(value) >= 1000 && unit < UNITS.length - 1) {
      value /= 1000;
      unit += 1;
    }
    let text = unit === 0 || value >= 99.95 ? Math.round(value).toString() : value.toFixed(1);
    if (text === "1000" && unit < UNITS.length - 1) {
      text = "1.0";
      unit += 1;
    }
    if (trim) text = text.replace(/\.0$/, "");
    return `${text} ${UNITS[unit]}`;
  }

  const formatRate = (bytesPerSecond, trim) => `${formatBytes(bytesPerSecond, trim)}/s`;
  const formatCount = (count) => count.toLocaleString("en-US");
  const pad2 = (number) => String(number).padStart(2, "0");

  /** Local wall-clock time of a unix timestamp: "14:05:09", or "14:05" without seconds. */
  function clock(unixSeconds, seconds = true) {
    const date = new Date(unixSeconds * 1000);
    const text = `${pad2(date.getHours())}:${pad2(date.getMinutes())}`;
    return seconds ? `${text}:${pad2(date.getSeconds())}` : text;
  }

  /** "last 5 min", "last 42 s": the window an answer covers. */
  function windowText(seconds) {
    if (!seconds) return "";
    return seconds % 60 === 0 ? `last ${seconds / 60} min` : `last ${seconds} s`;
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  /** A bar split into in and out, as wide as ``total / scale`` of its box. */
  function inOutBar(bytesIn, bytesOut, scale) {
    const bar = element("div", "bar");
    const part = (className, bytes) => {
      const piece = element("span", className);
      piece.style.width = `${scale ? (100 * bytes) / scale : 0}%`;
      bar.append(piece);
    };
    part("bar-in", bytesIn);
    part("bar-out", bytesOut);
    return bar;
  }

  async function getJson(path) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      const response = await fetch(path, {
        headers: { Accept: "application/json" }, cache: "no-store", signal: controller.signal,
      });
      if (!response.ok) throw new Error(`${path} answered HTTP ${response.status}`);
      return await response.json();
    } catch (error) {
      if (error.name === "AbortError") throw new Error(`${path} did not answer within ${TIMEOUT_MS / 1000} s`);
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /** How many seconds /traffic_history may be asked for: the OpenAPI document states the server's limit. */
  async function loadHistorySeconds() {
    const spec = await getJson("openapi.json");
    const limit = spec?.components?.parameters?.HistorySeconds?.schema?.maximum;
    return Math.min(WANTED_HISTORY_SECONDS, Number.isInteger(limit) && limit > 0 ? limit : WANTED_HISTORY_SECONDS);
  }

  function renderIndex(index) {
    const capture = index.capture;
    const state = $("capture-state");
    if (capture.running) {
      state.textContent = capture.source.startsWith("pcap:") ? "replaying" : "capturing";
      state.className = "pill pill-ok";
    } else if (capture.error) {
      state.textContent = "capture failed";
      state.className = "pill pill-bad";
    } else {
      state.textContent = "capture stopped";
      state.className = "pill pill-idle";
    }
    const servers = index.server_ips.join(", ") || "none";
    $("servers").textContent = servers;
    $("servers").title = servers;
    $("source").textContent = capture.source;
    $("source").title = capture.source;
    $("packets").textContent = formatCount(capture.packets);
    $("dropped").textContent = formatCount(capture.dropped);
    $("dropped").classList.toggle("warn", capture.dropped > 0);
    const captureError = $("capture-error");
    captureError.hidden = !capture.error;
    captureError.textContent = capture.error ? `Capture error: ${capture.error}` : "";
  }

  /** A round trip in seconds as ms (or s), "–" when there is none. */
  function formatSeconds(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    return seconds < 1 ? `${(seconds * 1000).toFixed(1)} ms` : `${seconds.toFixed(2)} s`;
  }

  /** A share as a percentage, "–" when there is none. */
  function formatRatio(ratio) {
    if (ratio === null || ratio === undefined) return "–";
    return `${(ratio * 100).toFixed(1)}%`;
  }

  /** "host.example · AS64496 Example Net · DE": what the server knows of a client (--resolve-names, --geoip-db).
   * Host names are whatever the reverse zone says: shown as text only, never as markup. */
  function clientFacts(client) {
    const network = [client.asn !== undefined ? `AS${client.asn}` : "", client.as_org || ""]
      .filter((part) => part && part !== client.ip).join(" ");
    return [client.hostname || "", network, client.country || ""]
      .filter((part) => part && part !== client.ip).join(" \u00b7 ");
  }

  function renderClients(traffic) {
    $("clients-window").textContent = windowText(traffic.window);
    const body = document.querySelector("#clients tbody");
    const rows = [];
    const top = traffic.clients.length ? traffic.clients[0].total : 0;
    for (const client of traffic.clients) {
      if (!client.total) continue;
      const row = element("tr");
      const name = element("td", "client mono", client.ip);
      const facts = clientFacts(client);
      if (facts) name.append(element("div", "client-facts", facts));
      name.title = facts ? `${client.ip} (${facts})` : client.ip;
      const [mostly, bytes] = Object.entries(client.protocols).reduce((a, b) => (b[1] > a[1] ? b : a));
      const share = element("td", "share");
      share.append(inOutBar(client.bytes_in, client.bytes_out, top));
      row.append(name, element("td", "", formatBytes(client.bytes_in)),
        element("td", "", formatBytes(client.bytes_out)), element("td", "total", formatBytes(client.total)), share,
        element("td", "mostly", `${mostly} ${Math.round((100 * bytes) / client.total)}%`),
        element("td", "tcp rtt", formatSeconds(client.handshake_rtt_p50_seconds)),
        element("td", "tcp retrans", formatRatio(client.retransmission_ratio)));
      rows.push(row);
    }
    // Without TCP health (--tcp-health off) the API has no such fields: the columns go.
    $("clients").classList.toggle("no-tcp", !traffic.clients.some((client) => "retransmission_ratio" in client));
    if (!rows.length) {
      const row = element("tr", "empty-row");
      const cell = element("td", "empty", "no traffic yet");
      cell.colSpan = 8;
      row.append(cell);
      rows.push(row);
    }
    body.replaceChildren(...rows);
  }

  function renderProtocols(protocols) {
    $("protocols-window").textContent = windowText(protocols.window);
    const box = $("protocols");
    const totalIn = protocols.protocols.reduce((sum, row) => sum + row.bytes_in, 0);
    $("protocols-total").textContent = protocols.total_bytes
      ? `Total ${formatBytes(protocols.total_bytes)}: in ${formatBytes(totalIn)}, ` +
        `out ${formatBytes(protocols.total_bytes - totalIn)}. Bars: in (blue) and out (orange).`
      : "";
    if (!protocols.total_bytes) {
      box.replaceChildren(element("p", "empty", "no traffic yet"));
      return;
    }
    const biggest = Math.max(...protocols.protocols.map((row) => row.bytes));
    const cells = [];
    for (const row of protocols.protocols) {
      const name = element("span", "name", row.protocol);
      const bar = inOutBar(row.bytes_in, row.bytes_out, biggest);
      bar.title = `${row.protocol}: in ${formatBytes(row.bytes_in)}, out ${formatBytes(row.bytes_out)}, ` +
        `${formatCount(row.packets)} packets`;
      const amount = element("span", "amount", `${formatBytes(row.bytes)} `);
      amount.append(element("span", "muted", `${(100 * row.share).toFixed(1)}%`));
      cells.push(name, bar, amount);
    }
    box.replaceChildren(...cells);
  }

  /** A step of 1, 2 or 5 times a power of ten giving about ``count`` intervals up to ``max``. */
  function niceStep(max, count) {
    const rough = max / count;
    const power = 10 ** Math.floor(Math.log10(rough));
    const factor = [1, 2, 2.5, 5, 10].find((candidate) => candidate * power >= rough);
    return factor * power;
  }

  function drawThroughput(buckets) {
    const canvas = $("throughput");
    const style = getComputedStyle(document.documentElement);
    const colors = { in: style.getPropertyValue("--in").trim(), out: style.getPropertyValue("--out").trim(),
      text: style.getPropertyValue("--muted").trim(), grid: style.getPropertyValue("--line").trim() };
    const ratio = window.devicePixelRatio || 1;
    const width = canvas.clientWidth;
    const height = canvas.clientHeight;
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);

    const peak = Math.max(0, ...buckets.map((bucket) => Math.max(bucket.bytes_in, bucket.bytes_out)));
    $("throughput-empty").hidden = peak > 0;
    if (!buckets.length) return;

    const plot = { left: 78, right: width - 12, top: 10, bottom: height - 26 };
    const step = niceStep(peak || 1000, 4);
    const top = Math.max(step, Math.ceil(peak / step) * step);
    const newest = buckets[buckets.length - 1].timestamp;
    const span = Math.max(MIN_CHART_SECONDS, buckets.length);
    const oldest = newest - span + 1;
    const x = (timestamp) => plot.left + ((timestamp - oldest) / (span - 1)) * (plot.right - plot.left);
    const y = (value) => plot.bottom - (value / top) * (plot.bottom - plot.top);

    context.font = "12px system-ui, sans-serif";
    context.lineWidth = 1;
    context.strokeStyle = colors.grid;
    context.fillStyle = colors.text;
    context.textAlign = "right";
    context.textBaseline = "middle";
    for (let value = 0; value <= top + step / 2; value += step) {
      context.beginPath();
      context.moveTo(plot.left, Math.round(y(value)) + 0.5);
      context.lineTo(plot.right, Math.round(y(value)) + 0.5);
      context.stroke();
      context.fillText(formatRate(value, true), plot.left - 8, y(value));
    }
    const tick = [10, 15, 30, 60, 120, 300, 600].find((seconds) => span / seconds <= 7) || 600;
    context.textAlign = "center";
    context.textBaseline = "top";
    for (let timestamp = Math.ceil(oldest / tick) * tick; timestamp <= newest; timestamp += tick) {
      const label = clock(timestamp, tick < 60);
      const half = context.measureText(label).width / 2;
      if (x(timestamp) - half >= plot.left - 8 && x(timestamp) + half <= width) {
        context.fillText(label, x(timestamp), plot.bottom + 8); // else it would overlap the y-axis labels
      }
    }

    for (const direction of ["out", "in"]) {
      const key = `bytes_${direction}`;
      context.beginPath();
      buckets.forEach((bucket, index) => {
        const method = index ? "lineTo" : "moveTo";
        context[method](x(bucket.timestamp), y(bucket[key]));
      });
      context.strokeStyle = colors[direction];
      context.lineWidth = 1.5;
      context.stroke();
      context.lineTo(x(newest), plot.bottom);
      context.lineTo(x(buckets[0].timestamp), plot.bottom);
      context.closePath();
      context.globalAlpha = 0.15;
      context.fillStyle = colors[direction];
      context.fill();
      context.globalAlpha = 1;
    }
  }

  function renderHistory(history) {
    lastHistory = history.buckets;
    $("throughput-window").textContent = windowText(history.buckets.length);
    const newest = history.buckets[history.buckets.length - 1];
    $("rate-in").textContent = newest ? formatRate(newest.bytes_in) : "–";
    $("rate-out").textContent = newest ? formatRate(newest.bytes_out) : "–";
    drawThroughput(history.buckets);
  }

  function showError(error) {
    const banner = $("error-banner");
    const when = $("updated").textContent;
    banner.textContent = `The API is unreachable (${error.message}). Retrying every ${POLL_MS / 1000} s` +
      (when !== "–" ? `; the figures below are from ${when}.` : ".");
    banner.hidden = false;
    document.body.classList.add("stale");
  }

  function clearError() {
    $("error-banner").hidden = true;
    document.body.classList.remove("stale");
  }

  async function poll() {
    try {
      if (historySeconds === null) historySeconds = await loadHistorySeconds();
      const [index, traffic, protocols, history] = await Promise.all([
        getJson("./"), getJson(`traffic?limit=${TOP_CLIENTS}`), getJson("protocols"),
        getJson(`traffic_history?seconds=${historySeconds}`),
      ]);
      renderIndex(index);
      renderClients(traffic);
      renderProtocols(protocols);
      renderHistory(history);
      $("updated").textContent = clock(traffic.generated_at);
      clearError();
    } catch (error) {
      showError(error);
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  window.addEventListener("resize", () => drawThroughput(lastHistory));
  poll();
})();
