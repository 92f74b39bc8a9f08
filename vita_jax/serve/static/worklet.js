// AudioWorklet: microphone samples at the context's rate -> 16 kHz mono int16, posted in 100 ms chunks.
// Resampling: each output sample is the mean of the input samples in its 1/16000 s span (a box filter,
// enough against aliasing for speech at 44.1/48 kHz), linear interpolation when the input is slower.
class PCM16k extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / 16000;   // input samples per output sample
    this.pos = 0;                     // position of the next output sample in the input stream
    this.acc = 0; this.n = 0; this.prev = 0;
    this.out = new Int16Array(1600); this.k = 0;
  }
  emit(v) {
    this.out[this.k++] = Math.max(-32768, Math.min(32767, Math.round(v * 32767)));
    if (this.k === this.out.length) { this.port.postMessage(this.out.buffer, [this.out.buffer]); this.out = new Int16Array(1600); this.k = 0; }
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      const x = ch[i];
      if (this.step >= 1) {
        this.acc += x; this.n++;
        this.pos += 1;
        if (this.pos >= this.step) { this.emit(this.acc / this.n); this.acc = 0; this.n = 0; this.pos -= this.step; }
      } else {
        while (this.pos <= 1) { this.emit(this.prev + (x - this.prev) * this.pos); this.pos += this.step; }
        this.pos -= 1; this.prev = x;
      }
    }
    return true;
  }
}
registerProcessor('pcm16k', PCM16k);
