/* ringvm test guest: the virtio-vsock scenario. A polling virtio-vsock driver (virtio 1.2
 * section 5.10) for stream sockets, run at CPL3 (native speed on kvm_pvm, where CPL0 is
 * interpreted).
 *
 * Set-up at CPL0 is only PCI: find the device (1af4:1053), enable its BARs, turn MSI-X off.
 * Everything else runs at CPL3 with IF=0, by MMIO and polling: reset, feature negotiation
 * (VERSION_1 and VIRTIO_VSOCK_F_STREAM), the three queues (rx 0, tx 1, event 2, avail
 * flags NO_INTERRUPT), the guest CID from the device configuration, DRIVER_OK, and the
 * protocol loop. Rings and buffers are in RAM at VS_MEM (not in .bss, which CPL0 zeroes).
 *
 * Protocol: one packet per descriptor (the 44-byte header, then the payload). Connections to
 * a host port (REQUEST, RESPONSE) or from the host to a guest listener (REQUEST answered with
 * RESPONSE, or RST for a port nobody listens on); RW within the host's credit (buf_alloc -
 * (tx_cnt - fwd_cnt)), with a CREDIT_REQUEST after ringvm.vsock.credit_req_ms (default 1000)
 * without credit; our own
 * buf_alloc (VS_BUF per connection) is never exceeded by a correct device (checked), and a
 * CREDIT_UPDATE goes out once the host's view of our free space fell below half; a
 * CREDIT_REQUEST is answered. SHUTDOWN from the host (its stream ended) finishes a listener's
 * connection; the guest ends a connection with SHUTDOWN(both) and waits for the device's RST.
 * The event queue takes TRANSPORT_RESET events.
 *
 * Applications (ringvm.vsock.app), one per connection:
 *  - connecting to ringvm.vsock.port (ringvm.vsock.conns connections at once):
 *    `echo` sends vsock.bytes of a per-connection pattern and checks that the same comes back;
 *    `source` sends vsock.bytes of xorshift data and prints its FNV-1a hash;
 *    `rst` sends vsock.bytes, waits for any byte from the host, then resets the connection;
 *    `reset` (one connection) echoes, then resets the device and initialises it again,
 *    waits for the TRANSPORT_RESET event, and echoes 4096 bytes on a new connection (with
 *    vsock.reset_stall_ms it resets once the first connection's sends stalled that long);
 *    `request` sends vsock.bytes of the pattern, half-closes (SHUTDOWN(SEND)) and hashes
 *    what comes back until the host's stream ends;
 *    `heal` (one connection at a time) echoes without end until a TRANSPORT_RESET event (the
 *    device process was killed and started again) ends the connection, then connects again,
 *    vsock.resets times (default 3); the last connection echoes vsock.bytes and closes.
 *  - listening on ringvm.vsock.listen (accepting vsock.conns host connections):
 *    `echo` sends back everything until the host's stream ends; `sink` hashes it.
 * For throughput runs (benches/benches/vsock.rs), ringvm.vsock.check=0 leaves the bytes
 * alone: `source` sends its slots as they are (no xorshift, no hash) and `sink` only counts,
 * so the guest's per-byte work does not cap the rate; ringvm.vsock.buf_alloc advertises a
 * larger receive buffer than VS_BUF for apps that do not keep what they receive.
 * Nothing waits forever: no data moving and no connection changing state for
 * ringvm.vsock.idle_ms (default 10000) fails the scenario with every connection's state. */
#include "virtio.h"

#define VSOCK_TYPE 19 /* 0x1040 + 19 = 0x1053 */
#define VSOCK_F_STREAM (1ull << 0)
#define VSOCK_F_SEQPACKET (1ull << 1)

#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUT_RCV 1
#define SHUT_SEND 2
#define TYPE_STREAM 1
#define HOST_CID 2
#define EVENT_TRANSPORT_RESET 0

struct __attribute__((packed)) vs_hdr {
	u64 src_cid, dst_cid;
	u32 src_port, dst_port, len;
	u16 type, op;
	u32 flags, buf_alloc, fwd_cnt;
};
_Static_assert(sizeof(struct vs_hdr) == 44, "virtio_vsock_hdr is 44 bytes");
#define HDR 44

#define QSIZE_MAX 256
#define RX_N 64
#define RX_PAYLOAD 65536
#define RX_STRIDE 0x11000
#define TX_N 64
#define TX_BURST 16
#define TX_PAYLOAD 32768
#define TX_STRIDE 0x9000
#define EV_N 4
#define MAX_CONNS 64
#define VS_BUF 65536 /* our buf_alloc per connection */
#define FIRST_PORT 49152

/* RAM layout at VS_MEM: three queues' rings (3 pages each), event buffers, rx buffers, tx
 * slots, per-connection receive buffers. */
#define VS_MEM 0x4000000ull
#define VS_EV (VS_MEM + 0x9000)
#define VS_RX (VS_MEM + 0x10000)
#define VS_TX (VS_RX + (u64)RX_N * RX_STRIDE)
#define VS_CONNBUF (VS_TX + (u64)TX_N * TX_STRIDE)
#define VS_MEM_END (VS_CONNBUF + (u64)MAX_CONNS * VS_BUF)

enum { APP_ECHO, APP_SOURCE, APP_RST, APP_RESET, APP_SINK, APP_REQUEST, APP_HEAL };
static const char *const app_names[] = {"echo", "source", "rst", "reset", "sink", "request", "heal"};
enum { C_FREE, C_CONNECTING, C_OPEN, C_CLOSING, C_CLOSED };
static const char *const state_names[] = {"free", "connecting", "open", "closing", "closed"};

struct vconn {
	u8 state, app, hold, reported, server;
	u32 num; /* connection number (pattern, messages) */
	u32 lport, pport;
	u32 peer_buf, peer_fwd, tx_cnt; /* the host's receive buffer, as it told us */
	u32 rx_cnt, fwd_cnt, fwd_sent;  /* ours */
	u32 peer_shut;
	u8 *rbuf; /* echo server: received, not yet sent back */
	u32 rhead, rlen;
	u64 to_send, sent, recvd;
	u64 hash_tx, hash_rx, xs;
	u64 stall_since, last_credit_req;
	u64 pause_until; /* sink: consume nothing before this TSC value */
	u8 paused, half_closed;
	u8 resettable; /* heal: echoes until a transport reset ends it */
};

struct vs_job {
	/* in */
	u32 app, conns, listen, port, idle_ms, expect_cid, credit_req_ms, pause_ms, reset_stall_ms, resets;
	u64 bytes, seed, pause_at;
	u32 buf_alloc; /* our buf_alloc per connection (VS_BUF unless ringvm.vsock.buf_alloc) */
	u8 check;      /* 0: source/sink neither generate nor hash their bytes */
	/* out */
	const char *fail;
	u64 cid;
	u16 cs;
	u32 accepted, events, events_after_reset, inits;
	u64 rx_packets, tx_packets, credit_updates_sent, credit_updates_got, credit_requests, stalls, max_stall_ms;
	u64 bytes_sent, bytes_recvd, rsts_sent_unknown, cycles, op0;
	u32 heal_rsts; /* heal: connections the restarted device answered with RST before its event */
};

static struct vs_job job;
static struct virtio_dev v;
static struct vq_poll qs[3];
static struct vconn conns[MAX_CONNS];
static u32 next_port;
static u16 tx_free[TX_N];
static u32 tx_nfree;
static u64 hz, last_progress;

/* ---- CPL3 from here ... ---- */
static u64 ms_to_cyc(u64 ms) { return ms * (hz / 1000); }
static u64 cyc_to_ms(u64 c) { return c / (hz / 1000); }
static void progress(void) { last_progress = rdtsc(); }

static u64 fnv(u64 h, const u8 *p, u32 n)
{
	for (u32 i = 0; i < n; i++) {
		h ^= p[i];
		h *= 0x100000001b3ull;
	}
	return h;
}
#define FNV_INIT 0xcbf29ce484222325ull

/* The echo pattern: byte i of connection c. */
static u8 pat(u32 c, u64 i) { return (u8)((i * 2654435761u >> 13) + c * 7 + (i >> 12)); }

static u8 *rx_buf(u32 i) { return phys(VS_RX + (u64)i * RX_STRIDE); }
static u8 *tx_buf(u32 i) { return phys(VS_TX + (u64)i * TX_STRIDE); }

/* The first failure, copied (failf's buffer is reused by the next failf). */
static const char *fail(const char *why)
{
	static char first[192];
	return fail_first(&job.fail, first, sizeof(first), why);
}

/* Reset, features, queues, CID, DRIVER_OK, buffers posted: the whole (re)initialisation. */
static const char *vs_init(void)
{
	u64 f;
	const char *why = virtio_poll_begin(&v, ms_to_cyc(1000), &f);
	if (why)
		return why;
	/* A device that offers neither VIRTIO_VSOCK_F_STREAM nor F_SEQPACKET has stream sockets
	 * only (virtio 1.3 5.10.3; devices older than the bit, e.g. vhost-device-vsock 0.3). */
	if (!(f & VIRTIO_F_VERSION_1) || (!(f & VSOCK_F_STREAM) && (f & VSOCK_F_SEQPACKET)))
		return failf("device features %#lx lack VERSION_1 or stream sockets", f);
	u64 want = VIRTIO_F_VERSION_1 | (f & VSOCK_F_STREAM) | (f & VIRTIO_F_ACCESS_PLATFORM);
	why = virtio_poll_features(&v, want, 3, "rx, tx, event");
	if (why)
		return why;
	for (u16 i = 0; i < 3; i++) {
		vqp_setup(&v, &qs[i], i, VS_MEM + (u64)i * 0x3000, QSIZE_MAX);
		if (qs[i].size < (i == 0 ? RX_N : i == 1 ? TX_N : EV_N))
			return failf("queue %u has %u entries, too few", i, qs[i].size);
		if (mmio_read16(v.common + CC_QENABLE) != 1)
			return failf("queue %u: queue_enable does not read 1", i);
	}
	job.cid = virtio_cfg(&v, 0, 8);
	why = virtio_poll_driver_ok(&v);
	if (why)
		return why;
	for (u32 i = 0; i < RX_N; i++) {
		qs[0].desc[i] = (struct vq_desc){(u64)rx_buf(i), HDR + RX_PAYLOAD, VQ_F_WRITE, 0};
		vqp_post(&qs[0], (u16)i);
	}
	for (u32 i = 0; i < EV_N; i++) {
		qs[2].desc[i] = (struct vq_desc){VS_EV + 8 * i, 8, VQ_F_WRITE, 0};
		vqp_post(&qs[2], (u16)i);
	}
	tx_nfree = TX_N;
	for (u32 i = 0; i < TX_N; i++)
		tx_free[i] = (u16)(TX_N - 1 - i);
	vqp_kick(&qs[0]);
	vqp_kick(&qs[2]);
	job.inits++;
	return 0;
}

static void tx_reclaim(void)
{
	u32 id, len;
	while (vqp_pop(&qs[1], &id, &len))
		if (id < TX_N && tx_nfree < TX_N)
			tx_free[tx_nfree++] = (u16)id;
}

/* A free tx slot, or -1. With wait, kicks and polls up to a second (the device returns tx
 * chains at once). */
static int tx_slot(int wait)
{
	tx_reclaim();
	if (!tx_nfree && wait) {
		vqp_kick(&qs[1]);
		u64 t0 = rdtsc();
		while (!tx_nfree && rdtsc() - t0 < ms_to_cyc(1000)) {
			cpu_relax();
			tx_reclaim();
		}
		if (!tx_nfree)
			fail(failf("no tx buffer came back for a second (%u in flight)", TX_N));
	}
	return tx_nfree ? tx_free[--tx_nfree] : -1;
}

static void tx_put(int slot, u32 src_port, u32 dst_port, u16 op, u32 flags, u32 len, u32 buf_alloc, u32 fwd)
{
	struct vs_hdr *h = (struct vs_hdr *)tx_buf((u32)slot);
	*h = (struct vs_hdr){job.cid, HOST_CID, src_port, dst_port, len, TYPE_STREAM, op, flags, buf_alloc, fwd};
	qs[1].desc[slot] = (struct vq_desc){(u64)h, HDR + len, 0, 0};
	vqp_post(&qs[1], (u16)slot);
	job.tx_packets++;
}

/* A packet of connection c: our credit goes with it. Data (len > 0) must already be in the slot. */
static void c_put(struct vconn *c, int slot, u16 op, u32 flags, u32 len)
{
	tx_put(slot, c->lport, c->pport, op, flags, len, job.buf_alloc, c->fwd_cnt);
	c->fwd_sent = c->fwd_cnt;
	c->tx_cnt += len;
}

/* A control packet of c (waits for a tx slot). */
static int c_ctl(struct vconn *c, u16 op, u32 flags)
{
	int slot = tx_slot(1);
	if (slot < 0)
		return 0;
	c_put(c, slot, op, flags, 0);
	return 1;
}

static struct vconn *c_find(u32 lport, u32 pport)
{
	for (u32 i = 0; i < MAX_CONNS; i++)
		if (conns[i].state != C_FREE && conns[i].lport == lport && conns[i].pport == pport)
			return &conns[i];
	return 0;
}

static struct vconn *c_new(u32 app, u32 num, u32 lport, u32 pport)
{
	for (u32 i = 0; i < MAX_CONNS; i++) {
		struct vconn *c = &conns[i];
		if (c->state != C_FREE)
			continue;
		memset(c, 0, sizeof(*c));
		c->num = num;
		c->app = (u8)app;
		c->lport = lport;
		c->pport = pport;
		c->rbuf = phys(VS_CONNBUF + (u64)i * VS_BUF);
		c->hash_tx = c->hash_rx = FNV_INIT;
		c->xs = job.seed ^ (0x9e3779b97f4a7c15ull * (num + 1));
		c->to_send = job.bytes;
		return c;
	}
	return 0;
}

static void c_fail(struct vconn *c, const char *f, ...) __attribute__((format(printf, 2, 3)));
static void c_fail(struct vconn *c, const char *f, ...)
{
	char what[128];
	va_list ap;
	va_start(ap, f);
	vfmt(what, sizeof(what), f, ap);
	va_end(ap);
	fail(failf("connection %u (guest port %u, host port %u, %s): %s", c->num, c->lport, c->pport,
		   state_names[c->state], what));
}

static void c_closed(struct vconn *c)
{
	c->state = C_CLOSED;
	progress();
}

/* Data of an RW packet for c. */
static void c_data(struct vconn *c, const u8 *p, u32 n)
{
	u32 free = job.buf_alloc - (c->rx_cnt - c->fwd_sent); /* the credit the device was given */
	if (n > free) {
		c_fail(c, "the device sent %u bytes with %u bytes of credit", n, free);
		return;
	}
	if (c->peer_shut & SHUT_SEND) {
		c_fail(c, "data after the host's SHUTDOWN(SEND)");
		return;
	}
	c->rx_cnt += n;
	if (job.check)
		c->hash_rx = fnv(c->hash_rx, p, n);
	if (c->server && c->app == APP_ECHO) {
		for (u32 i = 0; i < n; i++)
			c->rbuf[(c->rhead + c->rlen + i) % VS_BUF] = p[i];
		c->rlen += n;
	} else if (c->server && c->app == APP_SINK) {
		c->rlen += n; /* consumed (counted) in c_step, unless paused */
		if (job.pause_ms && !c->paused && c->recvd + n >= job.pause_at) {
			c->paused = 1;
			c->pause_until = rdtsc() + ms_to_cyc(job.pause_ms);
			say("virtio-vsock sink pausing for %u ms after %lu bytes", job.pause_ms, c->recvd + n);
		}
	} else {
		if (c->app == APP_REQUEST && !c->half_closed) {
			c_fail(c, "an answer before the request was complete");
			return;
		}
		if (c->app == APP_ECHO || c->app == APP_RESET || c->app == APP_HEAL) {
			for (u32 i = 0; i < n; i++)
				if (p[i] != pat(c->num, c->recvd + i)) {
					c_fail(c, "echoed byte %lu is %#x, sent %#x", c->recvd + i, p[i],
					       pat(c->num, c->recvd + i));
					return;
				}
			if (c->recvd + n > c->to_send) {
				c_fail(c, "more bytes echoed than sent");
				return;
			}
		}
		c->fwd_cnt += n; /* consumed at once */
	}
	c->recvd += n;
	job.bytes_recvd += n;
	progress();
}

static void rx_packet(const struct vs_hdr *h, u32 used_len)
{
	job.rx_packets++;
	if (used_len < HDR || h->len != used_len - HDR) {
		fail(failf("rx packet op %u: used len %u for a %u-byte payload", h->op, used_len, h->len));
		return;
	}
	if (h->src_cid != HOST_CID || h->dst_cid != job.cid || h->type != TYPE_STREAM) {
		fail(failf("rx packet from CID %lu to CID %lu type %u (we are CID %lu)", h->src_cid, h->dst_cid, h->type,
			   job.cid));
		return;
	}
	struct vconn *c = c_find(h->dst_port, h->src_port);
	if (h->op == OP_REQUEST && !c) {
		if (job.listen && h->dst_port == job.listen && job.accepted < job.conns) {
			c = c_new(job.app, job.accepted, h->dst_port, h->src_port);
			if (!c) {
				fail(failf("no free connection for a host connect"));
				return;
			}
			job.accepted++;
			c->server = 1;
			c->peer_buf = h->buf_alloc;
			c->peer_fwd = h->fwd_cnt;
			c->state = C_OPEN;
			c_ctl(c, OP_RESPONSE, 0);
			progress();
			return;
		}
	}
	if (!c) {
		if (h->op != OP_RST) {
			int slot = tx_slot(1);
			if (slot >= 0)
				tx_put(slot, h->dst_port, h->src_port, OP_RST, 0, 0, 0, 0);
			job.rsts_sent_unknown++;
		}
		return;
	}
	if (c->state == C_CLOSED)
		return; /* in flight when we closed it */
	c->peer_buf = h->buf_alloc;
	c->peer_fwd = h->fwd_cnt;
	switch (h->op) {
	case OP_RESPONSE:
		if (c->state != C_CONNECTING) {
			c_fail(c, "RESPONSE on a connection that is not connecting");
			return;
		}
		c->state = C_OPEN;
		progress();
		break;
	case OP_RST:
		if (c->state == C_CLOSING) {
			c_closed(c);
		} else if (c->resettable) {
			/* heal: a restarted device knows no connection and answers what the guest sent
			 * before it took the transport reset event with RST. */
			job.heal_rsts++;
			c_closed(c);
		} else {
			c_fail(c, c->state == C_CONNECTING ? "connection refused (RST)" : "reset by the host (RST)");
			c_closed(c);
		}
		break;
	case OP_SHUTDOWN:
		c->peer_shut |= h->flags & (SHUT_RCV | SHUT_SEND);
		progress();
		break;
	case OP_RW:
		if (c->state != C_OPEN && c->state != C_CLOSING) {
			c_fail(c, "data on a connection that is not open");
			return;
		}
		c_data(c, (const u8 *)(h + 1), h->len);
		break;
	case OP_CREDIT_UPDATE:
		job.credit_updates_got++;
		break;
	case OP_CREDIT_REQUEST:
		c_ctl(c, OP_CREDIT_UPDATE, 0);
		job.credit_updates_sent++;
		break;
	case OP_REQUEST:
		c_fail(c, "REQUEST for a connection that exists");
		break;
	case 0:
		/* vhost-device-vsock 0.3 sends an empty packet with op 0 when it wanted a credit
		 * update but had rx pending ("waste an rx buffer"): no operation, counted. */
		if (!h->len) {
			job.op0++;
			break;
		}
		c_fail(c, "op 0 with %u bytes", h->len);
		break;
	default:
		c_fail(c, "unknown op %u", h->op);
	}
}

static void poll_rx(void)
{
	u32 id, len;
	while (!job.fail && vqp_pop(&qs[0], &id, &len)) {
		if (id >= RX_N) {
			fail(failf("rx used id %u is not a buffer we posted", id));
			return;
		}
		rx_packet((const struct vs_hdr *)rx_buf(id), len);
		vqp_post(&qs[0], (u16)id);
	}
}

/* Returns events seen now. */
static u32 poll_events(void)
{
	u32 id, len, n = 0;
	while (vqp_pop(&qs[2], &id, &len)) {
		if (id >= EV_N || len < 4) {
			fail(failf("event used id %u len %u", id, len));
			return n;
		}
		u32 ev = *(volatile u32 *)phys(VS_EV + 8 * id);
		if (ev != EVENT_TRANSPORT_RESET) {
			fail(failf("unknown event id %u", ev));
			return n;
		}
		n++;
		job.events++;
		say("virtio-vsock event transport-reset (cid %lu)", virtio_cfg(&v, 0, 8));
		vqp_post(&qs[2], (u16)id);
		/* Every connection is gone (virtio 1.2 5.10.6.6). */
		for (u32 i = 0; i < MAX_CONNS; i++)
			if (conns[i].state == C_CONNECTING || conns[i].state == C_OPEN || conns[i].state == C_CLOSING) {
				if (conns[i].resettable) {
					c_closed(&conns[i]);
					continue;
				}
				c_fail(&conns[i], "transport reset while the connection was in use");
				conns[i].state = C_CLOSED;
			}
		job.cid = virtio_cfg(&v, 0, 8);
	}
	vqp_kick(&qs[2]);
	return n;
}

/* What connection c does now. */
static void c_step(struct vconn *c, u64 now)
{
	if (c->state != C_OPEN)
		return;
	if (c->pause_until && now < c->pause_until)
		progress(); /* a pause on purpose is not a hang */
	if (c->server && c->app == APP_SINK && c->rlen && now >= c->pause_until) {
		if (c->pause_until) {
			say("virtio-vsock sink resuming with %u bytes buffered (credit %u)", c->rlen, job.buf_alloc);
			c->pause_until = 0;
		}
		c->fwd_cnt += c->rlen;
		c->rlen = 0;
	}
	/* Our credit: the host hears of freed space once its view fell below half. */
	if (c->fwd_cnt - c->fwd_sent >= job.buf_alloc / 2) {
		c_ctl(c, OP_CREDIT_UPDATE, 0);
		job.credit_updates_sent++;
	}
	u32 credit = c->peer_buf - (c->tx_cnt - c->peer_fwd);
	if (c->peer_buf < c->tx_cnt - c->peer_fwd)
		credit = 0;
	int server = c->server;
	u64 want = 0;
	if (server && c->app == APP_ECHO)
		want = c->rlen;
	else if (!server)
		want = c->to_send - c->sent;
	if (want && (c->peer_shut & SHUT_RCV)) {
		c_fail(c, "the host shut its receive side with data left to send");
		return;
	}
	if (want && !credit) {
		if (!c->stall_since) {
			c->stall_since = now;
			c->last_credit_req = now;
			job.stalls++;
		} else if (now - c->last_credit_req > ms_to_cyc(job.credit_req_ms)) {
			c_ctl(c, OP_CREDIT_REQUEST, 0);
			job.credit_requests++;
			c->last_credit_req = now;
		}
	}
	if (want && credit) {
		if (c->stall_since) {
			u64 ms = cyc_to_ms(now - c->stall_since);
			if (ms > job.max_stall_ms)
				job.max_stall_ms = ms;
			c->stall_since = 0;
		}
		int slot = tx_slot(0);
		if (slot < 0)
			return;
		u32 n = (u32)(want < credit ? want : credit);
		if (n > TX_PAYLOAD)
			n = TX_PAYLOAD;
		u8 *p = tx_buf((u32)slot) + HDR;
		if (server) {
			for (u32 i = 0; i < n; i++)
				p[i] = c->rbuf[(c->rhead + i) % VS_BUF];
			c->rhead = (c->rhead + n) % VS_BUF;
			c->rlen -= n;
			c->fwd_cnt += n;
		} else if (c->app == APP_SOURCE && !job.check) {
			/* the slot's bytes as they are */
		} else if (c->app == APP_SOURCE) {
			u64 x = c->xs;
			for (u32 i = 0; i < n; i++) {
				if ((c->sent + i) % 8 == 0) {
					x ^= x << 13;
					x ^= x >> 7;
					x ^= x << 17;
				}
				p[i] = (u8)(x >> 8 * ((c->sent + i) % 8));
			}
			c->xs = x;
		} else {
			for (u32 i = 0; i < n; i++)
				p[i] = pat(c->num, c->sent + i);
		}
		if (job.check)
			c->hash_tx = fnv(c->hash_tx, p, n);
		c_put(c, slot, OP_RW, 0, n);
		c->sent += n;
		job.bytes_sent += n;
		progress();
		return;
	}
	if (want)
		return;
	/* Done sending: is the connection finished? */
	int finished = 0;
	if (server)
		finished = (c->peer_shut & SHUT_SEND) != 0 && !c->rlen;
	else if (c->app == APP_ECHO || c->app == APP_RESET || c->app == APP_HEAL)
		finished = c->recvd == c->to_send && !c->hold;
	else if (c->app == APP_SOURCE)
		finished = 1;
	else if (c->app == APP_REQUEST && !c->half_closed) {
		/* The request is out: half-close, then take the answer until the host's stream ends. */
		if (c_ctl(c, OP_SHUTDOWN, SHUT_SEND)) {
			c->half_closed = 1;
			say("virtio-vsock request: %lu bytes sent, SHUTDOWN(SEND) on guest port %u", c->sent, c->lport);
			progress();
		}
		return;
	} else if (c->app == APP_REQUEST)
		finished = (c->peer_shut & SHUT_SEND) != 0;
	else if (c->app == APP_RST && c->recvd > 0) {
		c_ctl(c, OP_RST, 0);
		say("virtio-vsock rst sent on guest port %u after %lu bytes sent and %lu received", c->lport, c->sent,
		    c->recvd);
		c_closed(c);
		return;
	}
	if (finished && c_ctl(c, OP_SHUTDOWN, SHUT_RCV | SHUT_SEND)) {
		c->state = C_CLOSING;
		progress();
	}
}

static void c_report(struct vconn *c)
{
	if (c->reported)
		return;
	c->reported = 1;
	if (job.conns <= 4)
		say("virtio-vsock conn %u app=%s guest-port=%u host-port=%u sent=%lu received=%lu sent-hash=%#lx "
		    "received-hash=%#lx",
		    c->num, app_names[c->app], c->lport, c->pport, c->sent, c->recvd, c->hash_tx, c->hash_rx);
}

static struct vconn *c_connect(u32 app, u32 num)
{
	struct vconn *c = c_new(app, num, next_port++, job.port);
	if (!c) {
		fail(failf("no free connection"));
		return 0;
	}
	c->state = C_CONNECTING;
	c_ctl(c, OP_REQUEST, 0);
	return c;
}

static void dump_states(void)
{
	for (u32 i = 0; i < MAX_CONNS; i++) {
		struct vconn *c = &conns[i];
		if (c->state == C_FREE || c->state == C_CLOSED)
			continue;
		say("virtio-vsock stuck conn %u %s guest-port=%u host-port=%u sent=%lu/%lu received=%lu credit: "
		    "peer-buf=%u peer-fwd=%u tx-cnt=%u rx-cnt=%u fwd-cnt=%u peer-shut=%u rlen=%u",
		    c->num, state_names[c->state], c->lport, c->pport, c->sent, c->to_send, c->recvd, c->peer_buf,
		    c->peer_fwd, c->tx_cnt, c->rx_cnt, c->fwd_cnt, c->peer_shut, c->rlen);
	}
}

/* Runs the loop until every connection closed (returns 1), or a failure / the idle limit. */
static int vs_loop(int (*done)(void))
{
	for (;;) {
		u64 now = rdtsc();
		poll_rx();
		poll_events();
		tx_reclaim();
		for (u32 i = 0; i < MAX_CONNS && !job.fail; i++) {
			/* Up to TX_BURST packets of a connection per kick, as a driver that drains its
			 * send queue before it notifies the device. */
			for (u32 k = 0; k < TX_BURST; k++) {
				u64 sent = job.tx_packets;
				c_step(&conns[i], now);
				if (job.tx_packets == sent || conns[i].state != C_OPEN || job.fail)
					break;
			}
			if (conns[i].state == C_CLOSED)
				c_report(&conns[i]);
		}
		vqp_kick(&qs[1]);
		vqp_kick(&qs[0]);
		if (job.fail)
			return 0;
		if (done())
			return 1;
		if (now > last_progress && now - last_progress > ms_to_cyc(job.idle_ms)) {
			dump_states();
			fail(failf("nothing moved for %u ms (sent %lu, received %lu bytes; status %#x)", job.idle_ms,
				   job.bytes_sent, job.bytes_recvd, mmio_read8(v.common + CC_STATUS)));
			return 0;
		}
	}
}

static int all_closed(void)
{
	u32 closed = 0;
	for (u32 i = 0; i < MAX_CONNS; i++) {
		if (conns[i].state == C_CLOSED)
			closed++;
		else if (conns[i].state != C_FREE)
			return 0;
	}
	return closed >= job.conns;
}

/* When the reset app resets the device: after its echo, or (vsock.reset_stall_ms) once its
 * sends stalled on credit that long, i.e. with the device's buffers full. */
static int reset_due(void)
{
	struct vconn *c = &conns[0];
	if (c->state != C_OPEN)
		return 0;
	if (job.reset_stall_ms)
		return c->stall_since && rdtsc() - c->stall_since >= ms_to_cyc(job.reset_stall_ms);
	return c->recvd == c->to_send;
}

/* heal: the connection a transport reset is to end, and job.events when it opened. */
static struct vconn *heal_conn;
static u32 heal_events;
static u64 heal_closed_at;

/* The heal connection is gone and the device's TRANSPORT_RESET event came. */
static int heal_reset_seen(void)
{
	if (heal_conn->state != C_CLOSED)
		return 0;
	if (job.events > heal_events)
		return 1;
	if (!heal_closed_at)
		heal_closed_at = rdtsc();
	else if (rdtsc() - heal_closed_at > ms_to_cyc(5000))
		fail(failf("connection %u was reset, and no TRANSPORT_RESET event came within 5 s", heal_conn->num));
	return 0;
}

/* heal: connection 0 echoes until a transport reset (the device process was killed and
 * started again) ends it; after the event connection 1 does the same, and so on; the
 * connection after the last of vsock.resets events echoes vsock.bytes and closes. */
static int heal_rounds(void)
{
	say("virtio-vsock heal: echoing across %u transport resets", job.resets);
	struct vconn *c = &conns[0];
	for (u32 round = 1; round <= job.resets; round++) {
		heal_conn = c;
		heal_events = job.events;
		heal_closed_at = 0;
		u32 rsts = job.heal_rsts;
		if (!vs_loop(heal_reset_seen))
			return 0;
		say("virtio-vsock heal: transport reset %u ended connection %u after %lu bytes echoed (%s)", round, c->num,
		    c->recvd, job.heal_rsts > rsts ? "an RST came first" : "by the event");
		c = c_connect(APP_HEAL, round);
		if (!c)
			return 0;
		if (round < job.resets) {
			c->resettable = 1;
			c->to_send = ~0ull;
		}
		vqp_kick(&qs[1]);
	}
	return 1;
}

static void user_vsock(void *arg)
{
	struct vs_job *j = arg;
	j->cs = read_cs();
	hz = tsc_hz_or_guess();
	u64 t0 = rdtsc();
	progress();
	const char *why = vs_init();
	if (why) {
		fail(why);
		return;
	}
	say("virtio-vsock guest-cid=%lu queues rx=%u tx=%u event=%u app=%s", j->cid, qs[0].size, qs[1].size, qs[2].size,
	    app_names[j->app]);
	if (j->expect_cid && j->cid != j->expect_cid) {
		fail(failf("the device says CID %lu, want %u", j->cid, j->expect_cid));
		return;
	}
	/* A transport reset the device queued before this driver started (it may owe one for the
	 * reset at the start of initialisation) is taken now, before any connection exists. */
	u64 te = rdtsc();
	while (rdtsc() - te < ms_to_cyc(50))
		poll_events();
	next_port = FIRST_PORT;
	if (j->listen) {
		say("virtio-vsock listening port=%u conns=%u", j->listen, j->conns);
		progress();
	} else {
		for (u32 i = 0; i < j->conns; i++) {
			struct vconn *c = c_connect(j->app, i);
			if (c && j->app == APP_RESET)
				c->hold = 1;
			if (c && j->app == APP_HEAL) {
				c->resettable = 1;
				c->to_send = ~0ull;
			}
		}
		vqp_kick(&qs[1]);
	}
	if (j->app == APP_RESET) {
		if (!vs_loop(reset_due))
			return;
		say("virtio-vsock reset: sent %lu bytes, echoed %lu on guest port %u; resetting the device", conns[0].sent,
		    conns[0].recvd, conns[0].lport);
		c_report(&conns[0]);
		why = vs_init();
		if (why) {
			fail(why);
			return;
		}
		/* The old connection is gone with the reset: the device owes a transport reset. */
		memset(conns, 0, sizeof(conns));
		u32 before = j->events;
		u64 tr = rdtsc();
		while (j->events == before && !j->fail && rdtsc() - tr < ms_to_cyc(5000)) {
			/* Connections are gone: poll_events must not find any in use. */
			poll_events();
			cpu_relax();
		}
		if (j->fail)
			return;
		j->events_after_reset = j->events - before;
		if (!j->events_after_reset) {
			fail(failf("no TRANSPORT_RESET event within 5 s of the re-initialisation"));
			return;
		}
		say("virtio-vsock reset: transport-reset events=%u after the re-initialisation", j->events_after_reset);
		progress();
		struct vconn *c = c_connect(APP_RESET, 1);
		if (c)
			c->to_send = 4096;
		vqp_kick(&qs[1]);
	}
	if (j->app == APP_HEAL && !heal_rounds())
		return;
	if (!vs_loop(all_closed))
		return;
	j->cycles = rdtsc() - t0;
	for (u32 i = 0; i < MAX_CONNS; i++)
		if (conns[i].state == C_CLOSED)
			c_report(&conns[i]);
}
/* ... to here. */

static const char *vs_run(void)
{
	memset(&job, 0, sizeof(job));
	memset(conns, 0, sizeof(conns));
	u64 x;
	const char *app = opt("vsock.app");
	job.app = APP_ECHO;
	if (app) {
		u32 k = 0;
		for (; k < sizeof(app_names) / sizeof(app_names[0]); k++)
			if (str_eq_n(app, app_names[k], strlen(app)) && strlen(app) == strlen(app_names[k]))
				break;
		if (k == sizeof(app_names) / sizeof(app_names[0]))
			return failf("ringvm.vsock.app=%s: want echo, source, rst, reset, request, heal or sink", app);
		job.app = k;
	}
	job.conns = 1;
	if (opt_u64("vsock.conns", &x)) {
		if (x < 1 || x > MAX_CONNS)
			return failf("ringvm.vsock.conns=%lu: want 1..%u", x, MAX_CONNS);
		job.conns = (u32)x;
	}
	job.bytes = 4096;
	if (opt_u64("vsock.bytes", &x))
		job.bytes = x;
	job.idle_ms = 10000;
	if (opt_u64("vsock.idle_ms", &x)) {
		if (x < 100 || x > 600000)
			return failf("ringvm.vsock.idle_ms=%lu: want 100..600000", x);
		job.idle_ms = (u32)x;
	}
	job.credit_req_ms = 1000;
	if (opt_u64("vsock.credit_req_ms", &x)) {
		if (x < 10 || x > 600000)
			return failf("ringvm.vsock.credit_req_ms=%lu: want 10..600000", x);
		job.credit_req_ms = (u32)x;
	}
	if (opt_u64("vsock.pause_ms", &x)) {
		if (x > 60000)
			return failf("ringvm.vsock.pause_ms=%lu: want at most 60000", x);
		job.pause_ms = (u32)x;
	}
	if (opt_u64("vsock.reset_stall_ms", &x)) {
		if (x < 1 || x > 60000)
			return failf("ringvm.vsock.reset_stall_ms=%lu: want 1..60000", x);
		job.reset_stall_ms = (u32)x;
	}
	job.resets = 3;
	if (opt_u64("vsock.resets", &x)) {
		if (x < 1 || x > 32)
			return failf("ringvm.vsock.resets=%lu: want 1..32", x);
		job.resets = (u32)x;
	}
	job.pause_at = 1 << 20;
	opt_u64("vsock.pause_at", &job.pause_at);
	job.seed = 0x5eed;
	opt_u64("vsock.seed", &job.seed);
	job.check = 1;
	if (opt_u64("vsock.check", &x)) {
		if (x > 1)
			return failf("ringvm.vsock.check=%lu: want 0 or 1", x);
		job.check = (u8)x;
	}
	job.buf_alloc = VS_BUF;
	if (opt_u64("vsock.buf_alloc", &x)) {
		if (x < 4096 || x > (64u << 20))
			return failf("ringvm.vsock.buf_alloc=%lu: want 4096..67108864", x);
		job.buf_alloc = (u32)x;
	}
	if (opt_u64("vsock.cid", &x))
		job.expect_cid = (u32)x;
	if (opt_u64("vsock.listen", &x)) {
		if (x == 0 || x > 0xffffffffull)
			return failf("ringvm.vsock.listen=%lu: want a port", x);
		job.listen = (u32)x;
		if (job.app != APP_ECHO && job.app != APP_SINK)
			return failf("ringvm.vsock.app=%s with vsock.listen: want echo or sink", app_names[job.app]);
		if (job.app == APP_ECHO && job.buf_alloc > VS_BUF)
			return failf("ringvm.vsock.buf_alloc=%u: a listening echo keeps what it receives, at most %u",
				     job.buf_alloc, VS_BUF);
	} else {
		if (!opt_u64("vsock.port", &x) || x > 0xffffffffull)
			return failf("give ringvm.vsock.port=PORT (connect) or ringvm.vsock.listen=PORT");
		job.port = (u32)x;
		if (job.app == APP_SINK)
			return failf("ringvm.vsock.app=sink needs vsock.listen");
		if ((job.app == APP_RESET || job.app == APP_RST || job.app == APP_HEAL) && job.conns != 1)
			return failf("ringvm.vsock.app=%s takes one connection", app_names[job.app]);
	}
	const char *why = virtio_poll_open(&v, "virtio-vsock", VSOCK_TYPE, VS_MEM, VS_MEM_END);
	if (why)
		return why;

	const char *ran = run_user(user_vsock, &job, &job.cs, "driver");
	if (ran)
		return ran;
	u64 ms = job.cycles / (tsc_hz_or_guess() / 1000);
	say("virtio-vsock stats conns=%u accepted=%u bytes-sent=%lu bytes-received=%lu tx-packets=%lu rx-packets=%lu "
	    "time=%lums",
	    job.conns, job.accepted, job.bytes_sent, job.bytes_recvd, job.tx_packets, job.rx_packets, ms);
	say("virtio-vsock credit updates-sent=%lu updates-received=%lu requests=%lu stalls=%lu max-stall-ms=%lu "
	    "events=%u inits=%u unknown-rsts=%lu op0=%lu",
	    job.credit_updates_sent, job.credit_updates_got, job.credit_requests, job.stalls, job.max_stall_ms,
	    job.events, job.inits, job.rsts_sent_unknown, job.op0);
	return job.fail;
}

const char *scenario_virtio_vsock(void)
{
	return virtio_finish(&v, vs_run());
}
