/**
 * A small Prometheus registry: counters, gauges and histograms with labels, rendered in the
 * text exposition format. Hot paths take a labelled child once (`counter.labels(...)`) and then
 * only add numbers; nothing is formatted until the endpoint is scraped.
 */

type Labels = Readonly<Record<string, string>>;

function labelKey(labels: Labels): string {
  return Object.keys(labels)
    .sort()
    .map((key) => `${key}="${escapeLabel(labels[key]!)}"`)
    .join(',');
}

function escapeLabel(value: string): string {
  return value.replace(/\\/g, '\\\\').replace(/\n/g, '\\n').replace(/"/g, '\\"');
}

function series(name: string, key: string, extra = ''): string {
  const labels = [key, extra].filter((part) => part !== '').join(',');
  return labels === '' ? name : `${name}{${labels}}`;
}

interface Metric {
  render(): string;
}

export class CounterChild {
  value = 0;

  inc(amount = 1): void {
    this.value += amount;
  }
}

export class Counter implements Metric {
  readonly #children = new Map<string, CounterChild>();

  constructor(
    readonly name: string,
    readonly help: string,
  ) {}

  labels(labels: Labels = {}): CounterChild {
    const key = labelKey(labels);
    let child = this.#children.get(key);
    if (child === undefined) {
      child = new CounterChild();
      this.#children.set(key, child);
    }
    return child;
  }

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} counter`];
    for (const [key, child] of this.#children) lines.push(`${series(this.name, key)} ${child.value}`);
    return lines.join('\n');
  }
}

/** A gauge whose values are read when scraped. */
export class Gauge implements Metric {
  constructor(
    readonly name: string,
    readonly help: string,
    readonly collect: () => Iterable<[Labels, number]>,
  ) {}

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} gauge`];
    for (const [labels, value] of this.collect()) lines.push(`${series(this.name, labelKey(labels))} ${value}`);
    return lines.join('\n');
  }
}

export class HistogramChild {
  readonly counts: number[];
  sum = 0;
  count = 0;

  constructor(readonly bounds: readonly number[]) {
    this.counts = new Array<number>(bounds.length).fill(0);
  }

  observe(value: number): void {
    this.sum += value;
    this.count++;
    const index = this.bounds.findIndex((bound) => value <= bound);
    if (index >= 0) this.counts[index]!++;
  }
}

export class Histogram implements Metric {
  readonly #children = new Map<string, HistogramChild>();

  constructor(
    readonly name: string,
    readonly help: string,
    readonly bounds: readonly number[],
  ) {}

  labels(labels: Labels = {}): HistogramChild {
    const key = labelKey(labels);
    let child = this.#children.get(key);
    if (child === undefined) {
      child = new HistogramChild(this.bounds);
      this.#children.set(key, child);
    }
    return child;
  }

  render(): string {
    const lines = [`# HELP ${this.name} ${this.help}`, `# TYPE ${this.name} histogram`];
    for (const [key, child] of this.#children) {
      let cumulative = 0;
      child.bounds.forEach((bound, index) => {
        cumulative += child.counts[index]!;
        lines.push(`${series(`${this.name}_bucket`, key, `le="${bound}"`)} ${cumulative}`);
      });
      lines.push(`${series(`${this.name}_bucket`, key, 'le="+Inf"')} ${child.count}`);
      lines.push(`${series(`${this.name}_sum`, key)} ${child.sum}`);
      lines.push(`${series(`${this.name}_count`, key)} ${child.count}`);
    }
    return lines.join('\n');
  }
}

export class Registry {
  readonly #metrics: Metric[] = [];

  counter(name: string, help: string): Counter {
    return this.#add(new Counter(name, help));
  }

  gauge(name: string, help: string, collect: () => Iterable<[Labels, number]>): Gauge {
    return this.#add(new Gauge(name, help, collect));
  }

  histogram(name: string, help: string, bounds: readonly number[]): Histogram {
    return this.#add(new Histogram(name, help, bounds));
  }

  render(): string {
    return `${this.#metrics.map((metric) => metric.render()).join('\n')}\n`;
  }

  #add<M extends Metric>(metric: M): M {
    this.#metrics.push(metric);
    return metric;
  }
}
