/* ringvm test guest: the virtio-console scenario. A polling virtio-console driver (virtio 1.2
 * section 5.3, one port, no MULTIPORT) run at CPL3 (native speed on kvm_pvm, where CPL0 is
 * interpreted).
 *
 * Set-up at CPL0 is only PCI: find the device (1af4:1043), enable its BARs, turn MSI-X off.
 * At CPL3 with IF=0, by MMIO and polling: reset, VERSION_1 (+VIRTIO_CONSOLE_F_SIZE if offered:
 * cols and rows from the configuration), receiveq 0 and transmitq 1 (avail flags
 * NO_INTERRUPT), DRIVER_OK, CON_RX_N receive buffers posted. Then:
 *  - it writes `ringvm-console: hello from hvc0` on the transmit queue;
 *  - with ringvm.console.echo=1 it writes `ringvm-console: type a line`, collects input from
 *    the receive queue until a newline (at most 200 bytes, ringvm.console.idle_ms without
 *    input fails), and writes back `ringvm-console: echo <line>`;
 *  - with ringvm.console.bench=N it writes N bytes through the console (4 KiB chains, up to
 *    16 in flight) and then N bytes through the 8250 at COM2 (0x2f8, polling LSR like a
 *    driver), each timed with the TSC, and prints both rates.
 * Rings and buffers are in RAM at CON_MEM (not in .bss, which CPL0 zeroes). */
#include "virtio.h"

#define CON_TYPE 3 /* 0x1040 + 3 = 0x1043 */
#define CON_F_SIZE (1ull << 0)

#define QSIZE_MAX 64
#define CON_RX_N 16
#define CON_RX_BUF 256
#define CON_TX_N 16
#define CON_TX_BUF 4096
#define LINE_MAX 200
#define COM2 0x2f8

/* RAM layout at CON_MEM: two queues' rings (3 pages each), rx buffers, tx buffers. */
#define CON_MEM 0x5000000ull
#define CON_RX (CON_MEM + 0x6000)
#define CON_TX (CON_RX + CON_RX_N * CON_RX_BUF)
#define CON_MEM_END (CON_TX + CON_TX_N * CON_TX_BUF)

struct con_job {
	/* in */
	u32 echo, idle_ms;
	u64 bench;
	/* out */
	const char *fail;
	u16 cs, cols, rows;
	u32 sized;
	char line[LINE_MAX + 1];
	u32 line_len;
	u64 rx_bytes, tx_bytes, virtio_cycles, uart_cycles;
};

static struct con_job job;
static struct virtio_dev v;
static struct vq_poll qs[2];
static u64 hz;

/* ---- CPL3 from here ... ---- */
static u64 ms_to_cyc(u64 ms) { return ms * (hz / 1000); }

/* Makes descriptor id available and notifies the device. */
static void q_post(struct vq_poll *q, u16 id)
{
	vqp_post(q, id);
	vqp_kick(q);
}

static const char *fail(const char *why)
{
	static char first[192];
	return fail_first(&job.fail, first, sizeof(first), why);
}

static u8 *tx_buf(u32 i) { return phys(CON_TX + (u64)i * CON_TX_BUF); }
static u8 *rx_buf(u32 i) { return phys(CON_RX + (u64)i * CON_RX_BUF); }

static const char *con_init(void)
{
	u64 f;
	const char *why = virtio_poll_begin(&v, ms_to_cyc(1000), &f);
	if (why)
		return why;
	if (!(f & VIRTIO_F_VERSION_1))
		return failf("device features %#lx lack VERSION_1", f);
	u64 want = VIRTIO_F_VERSION_1 | (f & CON_F_SIZE) | (f & VIRTIO_F_ACCESS_PLATFORM);
	why = virtio_poll_features(&v, want, 2, "receiveq, transmitq");
	if (why)
		return why;
	for (u16 i = 0; i < 2; i++) {
		vqp_setup(&v, &qs[i], i, CON_MEM + (u64)i * 0x3000, QSIZE_MAX);
		if (qs[i].size < CON_RX_N)
			return failf("queue %u has %u entries, too few", i, qs[i].size);
	}
	if (f & CON_F_SIZE) {
		job.sized = 1;
		job.cols = (u16)virtio_cfg(&v, 0, 2);
		job.rows = (u16)virtio_cfg(&v, 2, 2);
	}
	why = virtio_poll_driver_ok(&v);
	if (why)
		return why;
	for (u32 i = 0; i < CON_RX_N; i++) {
		qs[0].desc[i] = (struct vq_desc){(u64)rx_buf(i), CON_RX_BUF, VQ_F_WRITE, 0};
		q_post(&qs[0], (u16)i);
	}
	return 0;
}

/* Writes n bytes (at most CON_TX_BUF) from tx slot 0 and waits until the device used them. */
static const char *con_write(const char *s, u32 n)
{
	memcpy(tx_buf(0), s, n);
	qs[1].desc[0] = (struct vq_desc){(u64)tx_buf(0), n, 0, 0};
	q_post(&qs[1], 0);
	u64 t0 = rdtsc();
	u32 id, len;
	while (!vqp_pop(&qs[1], &id, &len))
		if (rdtsc() - t0 > ms_to_cyc(5000))
			return failf("a %u-byte write was not used within 5 s", n);
	if (id != 0)
		return failf("transmitq used id %u, want 0", id);
	job.tx_bytes += n;
	return 0;
}

static const char *con_say(const char *text)
{
	return con_write(text, (u32)strlen(text));
}

/* Input until a newline (kept without it), reposting each receive buffer. */
static const char *con_read_line(void)
{
	u64 last = rdtsc();
	job.line_len = 0;
	for (;;) {
		u32 id, len;
		if (!vqp_pop(&qs[0], &id, &len)) {
			if (rdtsc() - last > ms_to_cyc(job.idle_ms))
				return failf("no input for %u ms (got %u bytes of the line)", job.idle_ms, job.line_len);
			cpu_relax();
			continue;
		}
		last = rdtsc();
		if (id >= CON_RX_N || len > CON_RX_BUF)
			return failf("receiveq used id %u len %u", id, len);
		job.rx_bytes += len;
		const u8 *b = rx_buf(id);
		int done = 0;
		for (u32 i = 0; i < len && !done; i++) {
			if (b[i] == '\n' || b[i] == '\r')
				done = job.line_len > 0;
			else if (job.line_len < LINE_MAX)
				job.line[job.line_len++] = (char)b[i];
		}
		q_post(&qs[0], (u16)id);
		if (done) {
			job.line[job.line_len] = 0;
			return 0;
		}
	}
}

/* n bytes through the console: 4 KiB chains, up to CON_TX_N in flight. */
static const char *bench_virtio(u64 n)
{
	for (u32 i = 0; i < CON_TX_N; i++)
		for (u32 k = 0; k < CON_TX_BUF; k++)
			tx_buf(i)[k] = (k % 64 == 63) ? '\n' : (u8)('a' + k % 26);
	u64 queued = 0, done = 0, t0 = rdtsc(), last = t0;
	u32 free_ids[CON_TX_N], nfree = CON_TX_N;
	for (u32 i = 0; i < CON_TX_N; i++)
		free_ids[i] = i;
	while (done < n) {
		while (nfree && queued < n) {
			u32 id = free_ids[--nfree];
			u32 len = n - queued < CON_TX_BUF ? (u32)(n - queued) : CON_TX_BUF;
			qs[1].desc[id] = (struct vq_desc){(u64)tx_buf(id), len, 0, 0};
			q_post(&qs[1], (u16)id);
			queued += len;
		}
		u32 id, len;
		if (vqp_pop(&qs[1], &id, &len)) {
			if (id >= CON_TX_N)
				return failf("transmitq used id %u", id);
			done += qs[1].desc[id].len;
			free_ids[nfree++] = id;
			last = rdtsc();
		} else if (rdtsc() - last > ms_to_cyc(5000)) {
			return failf("bench: no transmit buffer came back for 5 s (%lu of %lu bytes)", done, n);
		}
	}
	job.virtio_cycles = rdtsc() - t0;
	return 0;
}

/* n bytes through the 8250 at COM2, as a polling driver writes them. */
static const char *bench_uart(u64 n)
{
	u64 t0 = rdtsc();
	for (u64 k = 0; k < n; k++) {
		u64 w = rdtsc();
		while (!(inb(COM2 + 5) & 0x20))
			if (rdtsc() - w > ms_to_cyc(1000))
				return failf("bench: COM2 transmitter not ready for a second");
		outb(COM2, (k % 64 == 63) ? '\n' : (u8)('a' + k % 26));
	}
	job.uart_cycles = rdtsc() - t0;
	return 0;
}

static void user_console(void *arg)
{
	struct con_job *j = arg;
	j->cs = read_cs();
	hz = tsc_hz_or_guess();
	const char *why = con_init();
	if (!why)
		why = con_say("ringvm-console: hello from hvc0\n");
	if (!why && j->echo) {
		why = con_say("ringvm-console: type a line\n");
		if (!why)
			why = con_read_line();
		if (!why) {
			char out[LINE_MAX + 40];
			int n = fmt(out, sizeof(out), "ringvm-console: echo %s\n", j->line);
			why = con_write(out, (u32)n);
		}
	}
	if (!why && j->bench)
		why = bench_virtio(j->bench);
	if (!why && j->bench)
		why = bench_uart(j->bench);
	if (why)
		fail(why);
}
/* ... to here. */

static const char *con_run(void)
{
	memset(&job, 0, sizeof(job));
	u64 x;
	if (opt_u64("console.echo", &x))
		job.echo = x != 0;
	job.idle_ms = 10000;
	if (opt_u64("console.idle_ms", &x)) {
		if (x < 100 || x > 600000)
			return failf("ringvm.console.idle_ms=%lu: want 100..600000", x);
		job.idle_ms = (u32)x;
	}
	if (opt_u64("console.bench", &x)) {
		if (x > (1ull << 30))
			return failf("ringvm.console.bench=%lu: want at most 1 GiB", x);
		job.bench = x;
	}
	const char *why = virtio_poll_open(&v, "virtio-console", CON_TYPE, CON_MEM, CON_MEM_END);
	if (why)
		return why;

	const char *ran = run_user(user_console, &job, &job.cs, "driver");
	if (ran)
		return ran;
	if (job.sized)
		say("virtio-console size cols=%u rows=%u", job.cols, job.rows);
	else
		say("virtio-console size unknown (no VIRTIO_CONSOLE_F_SIZE)");
	if (job.echo && !job.fail)
		say("virtio-console line \"%s\" (%u bytes)", job.line, job.line_len);
	if (job.bench && !job.fail) {
		/* bytes/s = bytes * hz / cycles; bench <= 2^30 and hz / 1000 < 2^23 keep it in 64 bits */
		u64 hzk = tsc_hz_or_guess() / 1000;
		u64 vb = job.virtio_cycles ? job.bench * hzk * 1000 / job.virtio_cycles : 0;
		u64 ub = job.uart_cycles ? job.bench * hzk * 1000 / job.uart_cycles : 0;
		say("virtio-console bench bytes=%lu virtio-console=%lu B/s 8250=%lu B/s ratio=%lu", job.bench, vb, ub,
		    ub ? vb / ub : 0);
	}
	say("virtio-console stats tx-bytes=%lu rx-bytes=%lu queues rx=%u tx=%u", job.tx_bytes, job.rx_bytes, qs[0].size,
	    qs[1].size);
	return job.fail;
}

const char *scenario_virtio_console(void)
{
	return virtio_finish(&v, con_run());
}
