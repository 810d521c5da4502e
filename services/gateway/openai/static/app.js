// The live page: microphone (and camera or a file) into a Realtime session over /v1/realtime; the spoken answer
// plays as it arrives, its transcript beside it. The server detects the turns (server_vad): speak, pause, listen;
// speaking over an answer interrupts it. Plain JS, no build step.
"use strict";

const RATE = 24000;            // pcm16 at 24 kHz both ways (the Realtime API's default)
const SEND_EVERY = RATE / 10;  // 100 ms of audio per input_audio_buffer.append
const FRAME_MS = 1000;         // one video frame per second, as the model's live units take them

const $ = (id) => document.getElementById(id);
// What the page did, for people (the stats line) and for tests (window.minicpmo).
const stats = { state: "idle", framesSent: 0, audioSentMs: 0, audioChunksReceived: 0, audioChunksPlayed: 0,
                responses: 0, errors: [] };
window.minicpmo = { stats };

let ws = null, audio = null, media = null, frameTimer = null, answering = false;
let pending = [], pendingSamples = 0, playhead = 0, playing = new Set(), current = null;

function show() {
  $("stats").textContent = `frames sent ${stats.framesSent} · audio sent ${(stats.audioSentMs / 1000).toFixed(1)} s · ` +
    `answer chunks ${stats.audioChunksReceived} received, ${stats.audioChunksPlayed} played · answers ${stats.responses}`;
}

function status(text) { stats.state = text; $("status").textContent = text; show(); }

function line(kind, text) {
  const div = document.createElement("div");
  div.className = `turn ${kind}`;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function send(event) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event)); }

function toBase64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

function fromBase64(b64) { return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0)); }

// --- input ------------------------------------------------------------------------------------------------------

function onSamples(block) {
  pending.push(block);
  pendingSamples += block.length;
  if (pendingSamples < SEND_EVERY) return;
  const pcm = new Int16Array(pendingSamples);
  let at = 0;
  for (const b of pending) for (let i = 0; i < b.length; i++) pcm[at++] = Math.max(-1, Math.min(1, b[i])) * 32767;
  pending = []; pendingSamples = 0;
  send({ type: "input_audio_buffer.append", audio: toBase64(new Uint8Array(pcm.buffer)) });
  stats.audioSentMs += (pcm.length / RATE) * 1000;
  show();
}

function sendFrame() {
  const video = $("preview");
  if (!video.videoWidth) return;
  const canvas = document.createElement("canvas");
  const scale = Math.min(1, 640 / video.videoWidth);
  canvas.width = Math.round(video.videoWidth * scale);
  canvas.height = Math.round(video.videoHeight * scale);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  send({ type: "conversation.item.create",
         item: { type: "message", role: "user", content: [{ type: "input_image", image_url: canvas.toDataURL("image/jpeg", 0.8) }] } });
  stats.framesSent++;
  show();
}

async function openInput(source) {
  const video = $("preview");
  let node;
  if (source === "file") {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a file first");
    video.src = URL.createObjectURL(file);
    video.loop = true;
    await video.play();
    node = audio.createMediaElementSource(video);
  } else {
    const wantVideo = source === "camera";
    media = await navigator.mediaDevices.getUserMedia({
      audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true }, video: wantVideo });
    if (wantVideo) { video.srcObject = media; await video.play(); }
    node = audio.createMediaStreamSource(media);
  }
  await audio.audioWorklet.addModule("capture-worklet.js");
  const capture = new AudioWorkletNode(audio, "pcm-capture");
  capture.port.onmessage = (e) => onSamples(e.data);
  const mute = audio.createGain();
  mute.gain.value = 0;  // the worklet must be pulled by the graph; nothing of the input is heard
  node.connect(capture).connect(mute).connect(audio.destination);
  if (source !== "microphone") frameTimer = setInterval(sendFrame, FRAME_MS);
}

// --- output -----------------------------------------------------------------------------------------------------

function play(b64) {
  const bytes = fromBase64(b64);
  const pcm = new Int16Array(bytes.buffer, bytes.byteOffset, bytes.byteLength >> 1);
  if (!pcm.length) return;
  const buffer = audio.createBuffer(1, pcm.length, RATE);
  const ch = buffer.getChannelData(0);
  for (let i = 0; i < pcm.length; i++) ch[i] = pcm[i] / 32768;
  const src = audio.createBufferSource();
  src.buffer = buffer;
  src.connect(audio.destination);
  playhead = Math.max(playhead, audio.currentTime + 0.05);
  src.start(playhead);
  playhead += buffer.duration;
  playing.add(src);
  src.onended = () => { playing.delete(src); stats.audioChunksPlayed++; show(); };
  stats.audioChunksReceived++;
  show();
}

function stopPlayback() {
  for (const src of playing) { src.onended = null; src.stop(); }
  playing.clear();
  playhead = 0;
}

// --- the conversation ---------------------------------------------------------------------------------------------

function onEvent(ev) {
  switch (ev.type) {
    case "session.created": status("connected: speak"); break;
    case "input_audio_buffer.speech_started":
      stopPlayback();  // barge-in: the server cancels the answer, the page stops playing it
      status("listening…");
      break;
    case "input_audio_buffer.speech_stopped": status("thinking…"); line("user", "(you spoke)"); break;
    case "response.created":
      answering = true; $("cancel").disabled = false;
      current = line("assistant", "");
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (current) current.textContent += ev.delta;
      status("answering…");
      break;
    case "response.output_audio.delta": play(ev.delta); break;
    case "response.done":
      answering = false; $("cancel").disabled = true;
      stats.responses++;
      if (current && ev.response.status !== "completed") current.classList.add("cancelled");
      current = null;
      status(`answer ${ev.response.status}: speak again`);
      break;
    case "error":
      stats.errors.push(ev.error.message);
      line("error", `${ev.error.code || ev.error.type}: ${ev.error.message}`);
      break;
  }
}

async function referenceVoice() {
  const file = $("reference").files[0];
  if (!file) return null;
  return { data: toBase64(new Uint8Array(await file.arrayBuffer())), format: "wav" };
}

async function start() {
  const key = $("key").value.trim();
  if (!key) { status("enter an API key"); return; }
  localStorage.setItem("minicpmo-key", key);
  $("start").disabled = true;
  try {
    audio = new AudioContext({ sampleRate: RATE });
    await audio.resume();
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    ws = new WebSocket(`${scheme}://${location.host}/v1/realtime?model=MiniCPM-o-2_6`,
                       ["realtime", `openai-insecure-api-key.${key}`]);
    ws.onmessage = (m) => onEvent(JSON.parse(m.data));
    ws.onclose = (e) => { status(`disconnected${e.reason ? ": " + e.reason : ""}`); stop(); };
    await new Promise((ok, fail) => { ws.onopen = ok; ws.onerror = () => fail(new Error("cannot connect")); });
    const output = { voice: $("voice").value };
    const reference = await referenceVoice();
    if (reference) output.reference_voice = reference;
    send({ type: "session.update", session: { type: "realtime", output_modalities: ["audio"],
      instructions: $("instructions").value.trim(), audio: {
      input: { format: { type: "audio/pcm", rate: RATE },
               turn_detection: { type: "server_vad", threshold: 0.5, silence_duration_ms: 500, prefix_padding_ms: 300 } },
      output } } });
    await openInput($("source").value);
    $("stop").disabled = false;
  } catch (e) {
    status(`could not start: ${e.message}`);
    stop();
  }
}

function stop() {
  clearInterval(frameTimer); frameTimer = null;
  if (media) media.getTracks().forEach((t) => t.stop());
  media = null;
  if (ws) { ws.onclose = null; ws.close(); ws = null; }
  stopPlayback();
  if (audio) audio.close();
  audio = null; answering = false; pending = []; pendingSamples = 0;
  $("start").disabled = false; $("stop").disabled = true; $("cancel").disabled = true;
}

$("key").value = localStorage.getItem("minicpmo-key") || "";
$("source").onchange = () => { $("file").hidden = $("source").value !== "file"; };
$("start").onclick = start;
$("stop").onclick = () => { stop(); status("stopped"); };
$("cancel").onclick = () => { if (answering) send({ type: "response.cancel" }); stopPlayback(); };
show();
