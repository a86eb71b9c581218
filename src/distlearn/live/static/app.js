// distlearn live: the page. Two views, fed by server-sent events (see distlearn/live/server.py and toy.py).
// Charts: uPlot (vendored in static/vendor/uplot). Histogram, timeline and contour plot: canvas, drawn here.
"use strict";

(function () {
  const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                   "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  // ---------------------------------------------------------------------------------------------------------
  // Messages: problems reported by the server (malformed lines, missing runs, bad toy input), newest last.

  const messages = { list: document.getElementById("message-list"), seen: new Set() };

  function showMessage(text, level) {
    if (messages.seen.has(text)) return;
    messages.seen.add(text);
    const item = document.createElement("li");
    item.className = level || "error";
    item.textContent = text;
    messages.list.appendChild(item);
    while (messages.list.children.length > 200) messages.list.removeChild(messages.list.firstChild);
    document.getElementById("messages").hidden = false;
  }

  document.getElementById("clear-messages").addEventListener("click", () => {
    messages.list.textContent = "";
    messages.seen.clear();
    document.getElementById("messages").hidden = true;
  });

  // ---------------------------------------------------------------------------------------------------------
  // Views

  const views = { runs: document.getElementById("view-runs"), toy: document.getElementById("view-toy") };

  function showView(name) {
    for (const [key, element] of Object.entries(views)) element.hidden = key !== name;
    for (const tab of document.querySelectorAll("button.tab")) {
      tab.classList.toggle("active", tab.dataset.view === name);
    }
    if (name === "toy") {
      toy.open().catch((error) => showMessage(`toy problems: could not load the options (${error.message})`));
    }
    scheduleRender();
  }

  for (const tab of document.querySelectorAll("button.tab")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }

  // ---------------------------------------------------------------------------------------------------------
  // Charts: one uPlot per panel, rebuilt when its series change, otherwise fed new data.

  function chartWidth(element) {
    return Math.max(280, Math.floor(element.getBoundingClientRect().width || element.parentElement.clientWidth) - 4);
  }

  class LineChart {
    constructor(element, options) {
      this.element = element;
      this.options = options; // {xLabel, yLabel, logY}
      this.plot = null;
      this.signature = "";
    }

    // series: [{label, colour, x: [...], y: [...], dash, points, width}], x sorted ascending per series
    update(series, xLabel) {
      const usable = series.filter((s) => s.x.length > 0);
      let points = 0;
      for (const s of usable) for (const v of s.y) if (v !== null && v !== undefined) points += 1;
      this.element.dataset.points = String(points);
      const signature = xLabel + "|" + usable.map((s) => s.label + s.colour).join("|");
      if (usable.length === 0) {
        if (this.plot) { this.plot.destroy(); this.plot = null; }
        this.signature = "";
        this.element.textContent = "";
        const empty = document.createElement("p");
        empty.className = "muted";
        empty.textContent = "no data yet";
        this.element.appendChild(empty);
        return;
      }
      const data = uPlot.join(usable.map((s) => [Float64Array.from(s.x), s.y.map((v) => (v === null ? null : v))]));
      if (this.plot && signature === this.signature) {
        this.plot.setData(data);
        const width = chartWidth(this.element);
        if (Math.abs(width - this.plot.width) > 2) this.plot.setSize({ width, height: 240 });
        return;
      }
      if (this.plot) this.plot.destroy();
      this.element.textContent = "";
      this.signature = signature;
      const opts = {
        width: chartWidth(this.element),
        height: 240,
        scales: { x: { time: false }, y: this.options.logY ? { distr: 3 } : {} },
        axes: [
          { label: xLabel, size: 40 },
          { label: this.options.yLabel, size: 60 },
        ],
        legend: { live: true },
        series: [
          { label: xLabel },
          ...usable.map((s) => ({
            label: s.label,
            stroke: s.colour,
            width: s.width || 1.5,
            dash: s.dash,
            spanGaps: true,
            points: { show: !!s.points, size: 5, fill: s.colour },
            paths: s.noLine ? () => null : undefined,
          })),
        ],
      };
      this.plot = new uPlot(opts, data, this.element);
    }
  }

  const charts = {
    loss: new LineChart(document.getElementById("chart-loss"), { yLabel: "loss" }),
    accuracy: new LineChart(document.getElementById("chart-accuracy"), { yLabel: "accuracy" }),
    throughput: new LineChart(document.getElementById("chart-throughput"), { yLabel: "samples/s" }),
    bytes: new LineChart(document.getElementById("chart-bytes"), { yLabel: "MB sent" }),
  };

  // ---------------------------------------------------------------------------------------------------------
  // Runs: what the event stream told us, per run and per rank.

  const runs = new Map(); // id -> run

  function newRun(info) {
    return {
      id: info.id,
      label: info.label,
      path: info.path,
      colour: PALETTE[runs.size % PALETTE.length],
      ranks: new Map(), // rank -> {role, file, train: [], eval: [], summary}
      problem: null,
      process: null,
      exactStaleness: null, // {counts, source} from the parameter servers' reports
    };
  }

  function ensureRun(info) {
    let run = runs.get(info.id);
    if (!run) {
      run = newRun(info);
      runs.set(info.id, run);
    }
    return run;
  }

  function rankOf(run, rank) {
    let entry = run.ranks.get(rank);
    if (!entry) {
      entry = { rank, role: "worker", train: [], eval: [], summary: null };
      run.ranks.set(rank, entry);
    }
    return entry;
  }

  function addRecords(run, records) {
    for (const record of records) {
      const entry = rankOf(run, record.rank);
      entry.role = record.role;
      entry.file = record.file;
      if (record.kind === "train") entry.train.push(record);
      else if (record.kind === "eval") entry.eval.push(record);
      else if (record.kind === "summary") entry.summary = record;
    }
    run.problem = null;
  }

  function sortedRanks(run) {
    return [...run.ranks.values()].sort((a, b) => a.rank - b.rank);
  }

  // The rank whose training curve stands for the run: the lowest one that logs training records.
  function mainRank(run) {
    return sortedRanks(run).find((entry) => entry.train.length > 0) || null;
  }

  function evalRecords(run) {
    const all = [];
    for (const entry of run.ranks.values()) all.push(...entry.eval);
    return all.sort((a, b) => a.step - b.step || a.wall_time - b.wall_time);
  }

  function strictlyIncreasing(xs, ys) {
    const outX = [], outY = [];
    for (let i = 0; i < xs.length; i++) {
      if (outX.length && xs[i] <= outX[outX.length - 1]) {
        if (xs[i] === outX[outX.length - 1]) { outY[outY.length - 1] = ys[i]; }
        continue; // a restarted or resumed file: keep the series monotone for the chart
      }
      outX.push(xs[i]);
      outY.push(ys[i]);
    }
    return [outX, outY];
  }

  function series(label, colour, records, xKey, yFn, style) {
    const picked = records.filter((r) => r[xKey] !== null && yFn(r) !== null && yFn(r) !== undefined);
    const [x, y] = strictlyIncreasing(picked.map((r) => r[xKey]), picked.map(yFn));
    return Object.assign({ label, colour, x, y }, style || {});
  }

  // Job-level values over wall time: after every record of any rank, the sum over ranks of each rank's
  // latest value (samples/s of each replica, or bytes each process has sent so far).
  function jobSeries(run, field, scale) {
    const events = [];
    for (const entry of run.ranks.values()) {
      for (const r of entry.train) if (r[field] !== null) events.push([r.wall_time, entry.rank, r[field]]);
    }
    events.sort((a, b) => a[0] - b[0]);
    const latest = new Map();
    const x = [], y = [];
    for (const [time, rank, value] of events) {
      latest.set(rank, value);
      let total = 0;
      for (const v of latest.values()) total += v;
      if (x.length && time <= x[x.length - 1]) { y[y.length - 1] = total * scale; continue; }
      x.push(time);
      y.push(total * scale);
    }
    return { x, y };
  }

  // ---------------------------------------------------------------------------------------------------------
  // Rendering, at most a few times per second.

  let renderPending = false;
  let lastRender = 0;

  function scheduleRender() {
    if (renderPending) return;
    renderPending = true;
    const wait = Math.max(0, 200 - (performance.now() - lastRender));
    setTimeout(() => requestAnimationFrame(() => {
      renderPending = false;
      lastRender = performance.now();
      render();
    }), wait);
  }

  function render() {
    renderRunList();
    if (views.runs.hidden) return;
    const xKey = document.getElementById("x-axis").value;
    const xLabel = xKey === "step" ? "step" : "wall time (s)";
    const loss = [], accuracy = [], throughput = [], bytes = [];
    for (const run of runs.values()) {
      const main = mainRank(run);
      const evals = evalRecords(run);
      if (main) {
        loss.push(series(run.label + " train", run.colour, main.train, xKey, (r) => r.loss));
        accuracy.push(series(run.label + " train", run.colour, main.train, xKey, (r) => r.accuracy,
                             { width: 0.8, dash: [4, 3] }));
      }
      if (evals.length) {
        loss.push(series(run.label + " test", run.colour, evals, xKey, (r) => r.loss, { points: true, noLine: true }));
        accuracy.push(series(run.label + " test", run.colour, evals, xKey, (r) => r.accuracy,
                             { points: true, width: 2 }));
      }
      const speed = jobSeries(run, "samples_per_s", 1);
      if (speed.x.length) throughput.push(Object.assign({ label: run.label, colour: run.colour }, speed));
      const sent = jobSeries(run, "bytes_sent", 1e-6);
      if (sent.x.length) bytes.push(Object.assign({ label: run.label, colour: run.colour }, sent));
    }
    charts.loss.update(loss, xLabel);
    charts.accuracy.update(accuracy, xLabel);
    charts.throughput.update(throughput, "wall time (s)");
    charts.bytes.update(bytes, "wall time (s)");
    drawStaleness();
    drawTimeline();
  }

  function renderRunList() {
    const list = document.getElementById("run-list");
    list.textContent = "";
    document.getElementById("run-count").textContent = runs.size ? `${runs.size} run(s)` : "no runs yet";
    for (const run of runs.values()) {
      const card = document.createElement("div");
      card.className = "run-card";
      card.dataset.run = run.label;
      card.style.setProperty("--run-colour", run.colour);
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = run.label;
      name.title = run.path;
      card.appendChild(name);
      const main = mainRank(run);
      const last = main ? main.train[main.train.length - 1] : null;
      const evals = evalRecords(run);
      const lastEval = evals[evals.length - 1];
      const summary = [...run.ranks.values()].some((entry) => entry.summary);
      let state = run.problem ? "missing" : summary ? "finished" : last ? "training" : "waiting";
      if (run.process && run.process.state !== "running") state = run.process.state;
      const badge = document.createElement("span");
      badge.className = "state " + state;
      badge.textContent = state;
      card.appendChild(badge);
      const facts = document.createElement("span");
      facts.className = "muted";
      const parts = [];
      if (run.ranks.size) parts.push(`${run.ranks.size} rank(s)`);
      if (last) parts.push(`step ${last.step}`);
      if (lastEval && lastEval.accuracy !== null) parts.push(`test acc ${(100 * lastEval.accuracy).toFixed(1)}%`);
      facts.textContent = parts.join(" · ");
      card.appendChild(facts);
      if (run.process && run.process.log_tail) {
        const tail = document.createElement("pre");
        tail.textContent = run.process.log_tail;
        card.appendChild(tail);
      }
      list.appendChild(card);
    }
  }

  // Canvas helpers: crisp at any device pixel ratio.
  function prepareCanvas(canvas, height) {
    const width = Math.max(280, canvas.parentElement.clientWidth - 20);
    const ratio = window.devicePixelRatio || 1;
    canvas.style.height = height + "px";
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
    const context = canvas.getContext("2d");
    context.setTransform(ratio, 0, 0, ratio, 0, 0);
    context.clearRect(0, 0, width, height);
    context.font = "12px system-ui, sans-serif";
    return { context, width, height };
  }

  // Staleness histogram: exact per-update counts when the parameter servers' reports exist (end of a ps
  // run), otherwise the windowed means the workers log (rounded to whole versions), which grow live.
  function drawStaleness() {
    const canvas = document.getElementById("staleness");
    const groups = [];
    const notes = [];
    for (const run of runs.values()) {
      let counts = null;
      if (run.exactStaleness) {
        counts = new Map(Object.entries(run.exactStaleness.counts).map(([k, v]) => [Number(k), v]));
        notes.push(`${run.label}: every applied update (${run.exactStaleness.source})`);
      } else {
        const values = [];
        for (const entry of run.ranks.values()) {
          for (const r of entry.train) if (r.staleness !== null && r.staleness !== undefined) values.push(r.staleness);
        }
        if (values.length) {
          counts = new Map();
          for (const v of values) counts.set(Math.round(v), (counts.get(Math.round(v)) || 0) + 1);
          notes.push(`${run.label}: mean staleness per logging window (${values.length} windows, all workers)`);
        }
      }
      if (counts) groups.push({ run, counts });
    }
    document.getElementById("staleness-note").textContent =
      notes.length ? notes.join("; ") : "no asynchronous run yet (staleness is logged by ps and hogwild)";
    const { context, width, height } = prepareCanvas(canvas, 220);
    canvas.dataset.bars = "0";
    if (!groups.length) return;
    let maxKey = 0, maxFraction = 0;
    for (const group of groups) {
      let total = 0;
      for (const v of group.counts.values()) total += v;
      group.total = total;
      for (const [k, v] of group.counts) {
        maxKey = Math.max(maxKey, k);
        maxFraction = Math.max(maxFraction, v / total);
      }
    }
    const left = 44, bottom = 30, top = 10, right = 10;
    const plotW = width - left - right, plotH = height - top - bottom;
    const slot = plotW / (maxKey + 1);
    const barW = Math.max(2, (slot * 0.8) / groups.length);
    context.strokeStyle = "#98a2b3";
    context.fillStyle = "#475467";
    context.beginPath();
    context.moveTo(left, top);
    context.lineTo(left, top + plotH);
    context.lineTo(left + plotW, top + plotH);
    context.stroke();
    context.textAlign = "right";
    for (const f of [0, 0.5, 1]) {
      const y = top + plotH - f * plotH;
      context.fillText(`${Math.round(100 * f * maxFraction)}%`, left - 4, y + 4);
    }
    context.textAlign = "center";
    const labelEvery = Math.ceil((maxKey + 1) / 20);
    for (let k = 0; k <= maxKey; k += labelEvery) context.fillText(String(k), left + (k + 0.5) * slot, height - 14);
    context.fillText("staleness (parameter versions)", left + plotW / 2, height - 1);
    let bars = 0;
    groups.forEach((group, index) => {
      context.fillStyle = group.run.colour;
      for (const [k, v] of group.counts) {
        const h = (v / group.total / maxFraction) * plotH;
        const x = left + k * slot + slot * 0.1 + index * barW;
        context.fillRect(x, top + plotH - h, barW - 1, h);
        bars += 1;
      }
    });
    canvas.dataset.bars = String(bars);
  }

  // Per-rank activity: for each process, its logging windows laid on its own clock (wall_time since that
  // process started). Bar shade: samples/s relative to the row's best; grey at a window's end: the share of
  // the window blocked on communication (extra.comm_s), the coloured rest is compute; band below: bytes
  // sent per second relative to the fastest sender of the page; ticks: evaluations; a bar at the end: the
  // run finished.
  function drawTimeline() {
    const canvas = document.getElementById("timeline");
    const rows = [];
    let maxTime = 0, maxRate = 0;
    for (const run of runs.values()) {
      for (const entry of sortedRanks(run)) {
        const windows = [];
        let previous = null;
        for (const r of entry.train) {
          const start = previous ? previous.wall_time : Math.max(0, r.wall_time - 1e-9);
          const duration = r.wall_time - start;
          let rate = null;
          if (previous && r.bytes_sent !== null && previous.bytes_sent !== null && duration > 0) {
            rate = (r.bytes_sent - previous.bytes_sent) / duration;
            maxRate = Math.max(maxRate, rate);
          }
          const comm = r.extra && typeof r.extra.comm_s === "number" && duration > 0
            ? Math.min(1, r.extra.comm_s / duration) : null;
          windows.push({ start, end: r.wall_time, speed: r.samples_per_s, rate, comm });
          previous = r;
        }
        const times = [...entry.train, ...entry.eval].map((r) => r.wall_time);
        if (entry.summary) times.push(entry.summary.wall_time);
        if (!times.length) continue;
        maxTime = Math.max(maxTime, ...times);
        rows.push({ run, entry, windows });
      }
    }
    const rowH = 24, top = 6, bottom = 30, right = 12;
    const { context, width, height } = prepareCanvas(canvas, Math.max(80, top + bottom + rows.length * rowH));
    canvas.dataset.rows = String(rows.length);
    if (!rows.length) {
      context.fillStyle = "#667085";
      context.fillText("no records yet", 20, top + 20);
      return;
    }
    const rowLabel = (row) => `${row.run.label} · rank ${row.entry.rank} (${row.entry.role})`;
    // room for the longest row label, up to 40% of the width
    const left = Math.min(0.4 * width, 12 + Math.max(...rows.map((row) => context.measureText(rowLabel(row)).width)));
    const plotW = width - left - right;
    const xOf = (t) => left + (t / (maxTime || 1)) * plotW;
    let commWindows = 0;
    rows.forEach((row, index) => {
      const y = top + index * rowH;
      const fastest = Math.max(1e-12, ...row.windows.map((w) => w.speed || 0));
      context.fillStyle = "#1d2330";
      context.textAlign = "right";
      context.fillText(rowLabel(row), left - 6, y + 15);
      context.fillStyle = "#f2f4f7";
      context.fillRect(left, y + 2, plotW, rowH - 4);
      for (const w of row.windows) {
        const x0 = xOf(w.start), x1 = Math.max(xOf(w.end), x0 + 1);
        context.globalAlpha = 0.25 + 0.75 * ((w.speed || 0) / fastest);
        context.fillStyle = row.run.colour;
        context.fillRect(x0, y + 3, x1 - x0 - 0.5, rowH - 12);
        if (w.comm !== null && w.comm > 0) {  // the window's share blocked on communication, at its end
          const split = x1 - (x1 - x0) * w.comm;
          context.globalAlpha = 0.9;
          context.fillStyle = "#98a2b3";
          context.fillRect(split, y + 3, x1 - split - 0.5, rowH - 12);
          commWindows += 1;
        }
        if (w.rate !== null && maxRate > 0) {
          context.globalAlpha = 0.15 + 0.85 * (w.rate / maxRate);
          context.fillStyle = "#101828";
          context.fillRect(x0, y + rowH - 8, x1 - x0 - 0.5, 4);
        }
      }
      context.globalAlpha = 1;
      context.fillStyle = "#101828";
      for (const r of row.entry.eval) context.fillRect(xOf(r.wall_time) - 1, y + 1, 2, rowH - 2);
      if (row.entry.summary) {
        context.fillStyle = "#067647";
        context.fillRect(xOf(row.entry.summary.wall_time) - 2, y + 1, 4, rowH - 2);
      }
    });
    canvas.dataset.commWindows = String(commWindows);
    const axisY = top + rows.length * rowH + 4;
    context.strokeStyle = "#98a2b3";
    context.beginPath();
    context.moveTo(left, axisY);
    context.lineTo(left + plotW, axisY);
    context.stroke();
    context.fillStyle = "#475467";
    context.textAlign = "center";
    for (let i = 0; i <= 5; i++) {
      const t = (maxTime * i) / 5;
      context.fillText(t.toFixed(t < 10 ? 1 : 0), xOf(t), axisY + 14);
    }
    context.fillText("wall time of each process (s)", left + plotW / 2, axisY + 26);
  }

  document.getElementById("x-axis").addEventListener("change", scheduleRender);
  window.addEventListener("resize", scheduleRender);

  // ---------------------------------------------------------------------------------------------------------
  // The metrics stream. The server replays every run from its start on each connection, so a reconnect
  // clears what we had.

  const connection = document.getElementById("connection");

  function labelOf(runId) {
    const run = runs.get(runId);
    return run ? run.label : "";
  }

  function connect() {
    const source = new EventSource("/api/events");
    source.onopen = () => {
      connection.textContent = "live";
      connection.className = "connection live";
    };
    source.onerror = () => {
      connection.textContent = "connection lost: reconnecting…";
      connection.className = "connection down";
    };
    const on = (name, handler) => source.addEventListener(name, (event) => {
      handler(JSON.parse(event.data));
      scheduleRender();
    });
    on("hello", (data) => {
      runs.clear();
      for (const info of data.runs) ensureRun(info);
    });
    on("run", (data) => ensureRun(data));
    on("records", (data) => addRecords(ensureRun({ id: data.run, label: data.run, path: "" }), data.records));
    on("reset", (data) => {
      const run = runs.get(data.run);
      if (run) run.ranks.delete(data.rank);
      showMessage(`${labelOf(data.run)}: ${data.file} was rewritten from the start; showing the new run`, "info");
    });
    on("problem", (data) => {
      const run = data.run ? runs.get(data.run) : null;
      if (run && data.level === "error" && run.ranks.size === 0) run.problem = data.message;
      if (run && data.level === "info") run.problem = null;
      showMessage(data.message, data.level);
    });
    on("staleness", (data) => {
      const run = runs.get(data.run);
      if (run) run.exactStaleness = { counts: data.counts, source: data.source };
    });
    on("process", (data) => {
      const run = data.run ? runs.get(data.run) : null;
      if (run) run.process = data;
      if (data.state === "failed") {
        showMessage(`${data.label} failed (exit code ${data.returncode}): ${data.log_tail || "see its train.log"}`);
      }
    });
  }

  // ---------------------------------------------------------------------------------------------------------
  // The toy view: a problem's contour plot with optimizer paths growing step by step.

  const toy = {
    options: null,
    loading: null, // the promise of the options while they load
    surface: null,
    background: null, // an offscreen canvas with the shading and contour lines
    source: null,
    paths: new Map(), // optimizer -> {points: [[x, y]...], losses: [...], colour}
    steps: 0,
    chart: new LineChart(document.getElementById("chart-toy-loss"), { yLabel: "f − f*", logY: true }),
    final: null,

    problem() {
      const name = document.getElementById("toy-function").value;
      return this.options.problems.find((p) => p.name === name);
    },

    open() {
      if (this.options) { this.draw(); return Promise.resolve(); }
      if (!this.loading) {  // once, however often the tab is clicked while it loads
        this.loading = this.load().finally(() => { this.loading = null; });
      }
      return this.loading;
    },

    async load() {
      const response = await fetch("/api/toy/options");
      if (!response.ok) throw new Error(`the server answered ${response.status}`);
      this.options = await response.json();
      const select = document.getElementById("toy-function");
      for (const problem of this.options.problems) {
        const option = document.createElement("option");
        option.value = problem.name;
        option.textContent = problem.name;
        select.appendChild(option);
      }
      const box = document.getElementById("toy-optimizers");
      this.options.optimizers.forEach((name, index) => {
        const label = document.createElement("label");
        const input = document.createElement("input");
        input.type = "checkbox";
        input.value = name;
        input.checked = ["sgd", "momentum", "adam"].includes(name);
        const swatch = document.createElement("span");
        swatch.className = "swatch";
        swatch.style.background = PALETTE[index % PALETTE.length];
        label.append(input, swatch, document.createTextNode(name));
        box.appendChild(label);
      });
      document.getElementById("toy-steps").max = String(this.options.max_steps);
      select.addEventListener("change", () => this.loadSurface());
      await this.loadSurface();
    },

    colourOf(name) {
      return PALETTE[this.options.optimizers.indexOf(name) % PALETTE.length];
    },

    async loadSurface() {
      this.stop();
      this.paths.clear();
      this.final = null;
      this.steps = 0;
      const problem = this.problem();
      document.getElementById("toy-formula").textContent =
        `${problem.name}: ${plainFormula(problem.formula)}. ${problem.note}`;
      const response = await fetch("/api/toy/surface?function=" + encodeURIComponent(problem.name));
      const body = await response.json();
      if (!response.ok) { showMessage(body.error); return; }
      this.surface = body;
      this.background = null;
      this.draw();
    },

    selected() {
      return [...document.querySelectorAll("#toy-optimizers input:checked")].map((input) => input.value);
    },

    run() {
      this.stop();
      const chosen = this.selected();
      if (!chosen.length) { showMessage("choose at least one optimizer to run", "error"); return; }
      const params = new URLSearchParams({
        function: document.getElementById("toy-function").value,
        optimizers: chosen.join(","),
        lr: document.getElementById("toy-lr").value.trim(),
        steps: document.getElementById("toy-steps").value,
        delay: document.getElementById("toy-delay").value,
      });
      this.paths.clear();
      this.final = null;
      this.steps = 0;
      const source = new EventSource("/api/toy/run?" + params.toString());
      this.source = source;
      source.addEventListener("start", (event) => {
        const data = JSON.parse(event.data);
        for (const run of data.runs) {
          this.paths.set(run.optimizer, { points: [], losses: [], lr: run.lr, diverged: run.diverged });
        }
      });
      source.addEventListener("step", (event) => {
        const data = JSON.parse(event.data);
        for (const [name, point] of Object.entries(data.points)) {
          const path = this.paths.get(name);
          path.points.push(point);
          path.losses.push(data.losses[name]);
        }
        this.steps = data.t;
        this.scheduleDraw();
      });
      source.addEventListener("done", (event) => {
        this.final = JSON.parse(event.data).final;
        source.close();
        this.source = null;
        this.scheduleDraw();
      });
      source.addEventListener("problem", (event) => {
        showMessage("toy problems: " + JSON.parse(event.data).message);
        source.close();
        this.source = null;
      });
      source.onerror = () => {
        if (this.source === source) { source.close(); this.source = null; }
      };
    },

    stop() {
      if (this.source) { this.source.close(); this.source = null; }
    },

    drawPending: false,
    scheduleDraw() {
      if (this.drawPending) return;
      this.drawPending = true;
      requestAnimationFrame(() => { this.drawPending = false; this.draw(); });
    },

    buildBackground(width, height) {
      const surface = this.surface;
      const [x0, x1, y0, y1] = surface.window;
      const canvas = document.createElement("canvas");
      canvas.width = width;
      canvas.height = height;
      const context = canvas.getContext("2d");
      // shading: log10(f - f*) through a lightened viridis ramp (dark: near the minimum)
      const n = surface.shading.resolution;
      const image = context.createImageData(n, n);
      const [low, high] = surface.log_range;
      for (let row = 0; row < n; row++) {
        for (let column = 0; column < n; column++) {
          const value = surface.shading.values[row * n + column];
          const f = Math.min(1, Math.max(0, (value - low) / (high - low || 1)));
          const offset = ((n - 1 - row) * n + column) * 4; // row 0 is y_min: the bottom of the picture
          const [r, g, b] = ramp(f);
          image.data[offset] = r;
          image.data[offset + 1] = g;
          image.data[offset + 2] = b;
          image.data[offset + 3] = 255;
        }
      }
      const small = document.createElement("canvas");
      small.width = n;
      small.height = n;
      small.getContext("2d").putImageData(image, 0, 0);
      context.imageSmoothingEnabled = true;
      context.drawImage(small, 0, 0, width, height);
      const xOf = (x) => ((x - x0) / (x1 - x0)) * width;
      const yOf = (y) => height - ((y - y0) / (y1 - y0)) * height;
      context.lineWidth = 0.8;
      for (const line of surface.lines) {
        const shade = Math.round(200 - (line.level / surface.levels) * 140);
        context.strokeStyle = `rgb(${shade}, ${shade}, ${Math.min(255, shade + 40)})`;
        context.beginPath();
        line.points.forEach(([x, y], index) => {
          if (index === 0) context.moveTo(xOf(x), yOf(y));
          else context.lineTo(xOf(x), yOf(y));
        });
        context.stroke();
      }
      return canvas;
    },

    draw() {
      if (!this.surface || views.toy.hidden) return;
      const canvas = document.getElementById("toy-canvas");
      const width = canvas.width, height = canvas.height;
      if (!this.background) this.background = this.buildBackground(width, height);
      const context = canvas.getContext("2d");
      context.drawImage(this.background, 0, 0);
      const [x0, x1, y0, y1] = this.surface.window;
      const xOf = (x) => ((x - x0) / (x1 - x0)) * width;
      const yOf = (y) => height - ((y - y0) / (y1 - y0)) * height;
      const problem = this.problem();
      context.fillStyle = "#f5b700";
      context.strokeStyle = "#5c4400";
      for (const [x, y] of problem.minima) {
        context.beginPath();
        star(context, xOf(x), yOf(y), 9, 4);
        context.fill();
        context.stroke();
      }
      context.fillStyle = "#000";
      context.beginPath();
      context.arc(xOf(problem.start[0]), yOf(problem.start[1]), 4, 0, 2 * Math.PI);
      context.fill();
      for (const [name, path] of this.paths) {
        if (!path.points.length) continue;
        context.strokeStyle = this.colourOf(name);
        context.lineWidth = 2;
        context.beginPath();
        path.points.forEach(([x, y], index) => {
          if (index === 0) context.moveTo(xOf(x), yOf(y));
          else context.lineTo(xOf(x), yOf(y));
        });
        context.stroke();
        const [hx, hy] = path.points[path.points.length - 1];
        context.fillStyle = this.colourOf(name);
        context.beginPath();
        context.arc(xOf(hx), yOf(hy), 5, 0, 2 * Math.PI);
        context.fill();
      }
      canvas.dataset.steps = String(this.steps);
      this.drawLosses();
      this.drawTable();
    },

    drawLosses() {
      const floor = 1e-16;
      const minimum = this.problem().minimum_value;
      const list = [];
      for (const [name, path] of this.paths) {
        if (!path.losses.length) continue;
        list.push({
          label: name,
          colour: this.colourOf(name),
          x: path.losses.map((_, t) => t),
          y: path.losses.map((loss) => Math.max(floor, loss - minimum)),
        });
      }
      this.chart.update(list, "step");
    },

    drawTable() {
      const table = document.getElementById("toy-table");
      table.textContent = "";
      if (!this.paths.size) return;
      const head = table.insertRow();
      for (const title of ["optimizer", "learning rate", "step", "f − f*", "gradient evaluations", ""]) {
        const cell = document.createElement("th");
        cell.textContent = title;
        head.appendChild(cell);
      }
      const minimum = this.problem().minimum_value;
      for (const [name, path] of this.paths) {
        const row = table.insertRow();
        const last = path.losses.length ? path.losses[path.losses.length - 1] - minimum : null;
        const final = this.final ? this.final[name] : null;
        const cells = [
          name,
          path.lr.toPrecision(3),
          String(Math.max(0, path.points.length - 1)),
          last === null ? "" : last.toExponential(2),
          final ? String(final.gradient_evaluations) : "",
          path.diverged ? "diverged" : final ? "done" : "",
        ];
        for (const text of cells) row.insertCell().textContent = text;
        row.cells[0].style.color = this.colourOf(name);
      }
    },
  };

  // viridis at five stops, blended 45% toward white so the paths stand out
  const RAMP = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function ramp(f) {
    const position = f * (RAMP.length - 1);
    const i = Math.min(RAMP.length - 2, Math.floor(position));
    const t = position - i;
    return RAMP[i].map((c, k) => Math.round(0.55 * (c + t * (RAMP[i + 1][k] - c)) + 0.45 * 255));
  }

  // The problems' LaTeX formulas, readable as plain text.
  function plainFormula(latex) {
    return latex
      .replace(/\$/g, "")
      .replace(/\\frac\{([^}]*)\}\{([^}]*)\}/g, "($1)/($2)")
      .replace(/\\,/g, " ")
      .replace(/\\\|/g, "‖")
      .replace(/\^\\top/g, "ᵀ")
      .replace(/\\top/g, "ᵀ")
      .replace(/\\sum_i/g, "Σᵢ")
      .replace(/\\log/g, "log")
      .replace(/\\lambda/g, "λ")
      .replace(/[{}]/g, "");
  }

  function star(context, x, y, outer, inner) {
    for (let i = 0; i < 10; i++) {
      const radius = i % 2 === 0 ? outer : inner;
      const angle = -Math.PI / 2 + (i * Math.PI) / 5;
      const px = x + radius * Math.cos(angle), py = y + radius * Math.sin(angle);
      if (i === 0) context.moveTo(px, py);
      else context.lineTo(px, py);
    }
    context.closePath();
  }

  document.getElementById("toy-run").addEventListener("click", () => toy.run());
  document.getElementById("toy-stop").addEventListener("click", () => toy.stop());

  // for tests and the curious: the page's state, read-only by convention
  window.distlearnLive = { runs, toy, showView };

  connect();
  scheduleRender();
})();
