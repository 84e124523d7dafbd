// <packmule-progress run="NAME" [api="BASE"]></packmule-progress>: a live progress bar for one packmule run.
// Renders, in the light DOM, a <progress> and a <span class="packmule-progress-text"> holding the run's
// progress string exactly as Runner.update_progress() gives it ('53.0 / 101.0').  Polls BASE/api/runs/NAME
// once a second while the run goes on, every 5 s once it has ended.  BASE defaults to this script's URL
// minus /static/progress.js (the place packmule.web is mounted); requests go with the page's cookies.
(function () {
  "use strict";
  const script = document.currentScript;
  const scriptBase = script ? script.src.replace(/\/static\/progress\.js(\?.*)?$/, '') : '';

  class PackmuleProgress extends HTMLElement {
    static get observedAttributes() { return ['run', 'api']; }

    connectedCallback() {
      if (!this.bar) {
        this.bar = document.createElement('progress');
        this.bar.max = 1;
        this.bar.value = 0;
        this.text = document.createElement('span');
        this.text.className = 'packmule-progress-text';
        this.append(this.bar, ' ', this.text);
      }
      this.restart();
    }

    disconnectedCallback() { clearTimeout(this.timer); this.timer = null; }

    attributeChangedCallback() { if (this.isConnected && this.bar) this.restart(); }

    restart() {
      clearTimeout(this.timer);
      this.generation = (this.generation || 0) + 1;
      this.poll(this.generation);
    }

    async poll(generation) {
      const run = this.getAttribute('run');
      const base = this.getAttribute('api') || scriptBase;
      let next = 1000;
      if (run) {
        try {
          const r = await fetch(base + '/api/runs/' + encodeURIComponent(run),
                                {credentials: 'same-origin', cache: 'no-store'});
          if (generation !== this.generation) return;  // the run or base changed meanwhile
          if (r.ok) {
            const info = await r.json();
            this.bar.max = Math.max(info.total, 1);
            this.bar.value = info.done;
            this.text.textContent = info.progress;
            this.dataset.state = info.state;
            if (info.complete || info.state === 'cancelled' || info.state === 'lost') next = 5000;
          } else {
            this.dataset.state = r.status === 404 ? 'no such run' : 'error ' + r.status;
          }
        } catch (e) {
          this.dataset.state = 'unreachable';
        }
      }
      if (generation === this.generation && this.isConnected) {
        this.timer = setTimeout(() => this.poll(generation), next);
      }
    }
  }

  if (!customElements.get('packmule-progress')) customElements.define('packmule-progress', PackmuleProgress);
})();
