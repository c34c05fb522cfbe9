/* ringvm test guest: the virtio-net scenario. Negotiates MAC, STATUS, MRG_RXBUF, CSUM and
 * GUEST_CSUM if offered (never any GSO), posts RX buffers on queue 0, sends on queue 1, and talks
 * to a host-side peer: ARP for the peer, three ICMP echoes, and a UDP echo (optional, with a
 * checksum offloaded through VIRTIO_NET_HDR_F_NEEDS_CSUM if asked). It answers ARP requests and
 * ICMP echo requests for its own address all the while, and for ringvm.net.serve_ms more
 * milliseconds at the end. With ringvm.net.bad=1 it puts malformed chains on the tx queue before
 * the UDP echo. With ringvm.net.pairs=N (N > 1) it also negotiates MQ and CTRL_VQ, sets up N
 * queue pairs and the control queue, enables the pairs with VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
 * receives on every pair and spreads the stream over them. Frames are handled in place in the
 * RX buffers: everything here runs at CPL0 (interpreted on kvm_pvm), so it stays small. */
#include "virtio.h"

#define NET_F_CSUM (1ull << 0)
#define NET_F_GUEST_CSUM (1ull << 1)
#define NET_F_MAC (1ull << 5)
#define NET_F_MRG_RXBUF (1ull << 15)
#define NET_F_STATUS (1ull << 16)
#define NET_F_CTRL_VQ (1ull << 17)
#define NET_F_MQ (1ull << 22)

#define HDR_F_NEEDS_CSUM 1
#define HDR_F_DATA_VALID 2
#define NET_S_LINK_UP 1

/* virtio_net_hdr_v1: 12 bytes with VERSION_1, whether or not MRG_RXBUF is negotiated. */
struct net_hdr {
	u8 flags, gso_type;
	u16 hdr_len, gso_size, csum_start, csum_offset, num_buffers;
};
#define HDR_LEN 12

#define RX_BUFS 8 /* per receive queue */
#define NET_MAX_PAIRS 2
#define CTRL_MQ 4 /* VIRTIO_NET_CTRL_MQ */
#define CTRL_MQ_VQ_PAIRS_SET 0
#define CTRL_OK 0
#define BUF_SIZE 2048 /* >= 1526: enough for a 1514-byte frame + header without GSO */
#define ETH_LEN 14
#define IP_LEN 20
#define ETH_ARP 0x0806
#define ETH_IP 0x0800
#define IP_ICMP 1
#define IP_UDP 17
#define PING_COUNT 3
#define PING_ID 0x5276 /* "Rv" */
#define PING_DATA 32
#define UDP_SRC_PORT 40007
#define STEP_MS 1000 /* per attempt */
#define ATTEMPTS 3

static u8 rx_ring[NET_MAX_PAIRS][3 * 4096] __attribute__((aligned(4096)));
static u8 tx_ring[NET_MAX_PAIRS][3 * 4096] __attribute__((aligned(4096)));
static u8 ctrl_ring[3 * 4096] __attribute__((aligned(4096)));
static u8 rx_buf[NET_MAX_PAIRS][RX_BUFS][BUF_SIZE] __attribute__((aligned(64)));
static u8 tx_buf[BUF_SIZE] __attribute__((aligned(64)));
static u8 ctrl_buf[16] __attribute__((aligned(16)));

static struct virtio_dev v;
/* A queue pair: pair 0 is v.q (rx, queue 0) and v.q1 (tx, queue 1); pair k has queues 2k, 2k+1. */
struct net_pair {
	struct virtq *rx, *tx;
	u8 buf_of_head[VQ_MAX]; /* rx buffer index of each chain head in flight */
	u32 rx_frames, tx_frames; /* frames that came on its rx queue, went on its tx queue */
	u32 stream_sent, stream_echoed; /* stream datagrams sent on it, echoes that came on it */
};
static struct net_pair pairs[NET_MAX_PAIRS];
static struct virtq pair_q[2 * (NET_MAX_PAIRS - 1)], ctrl_q;
static u32 npairs;
static struct net_pair *txp; /* where tx_send sends (pair 0 unless a step picks another) */
static struct net_pair *rxp; /* the pair of the frame being handled */
static u8 mac[6], peer_mac[6];
static const u8 bcast[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static u32 my_ip, peer_ip, udp_port;
static int mrg, have_peer, udp_unreach;
static u32 rx_skip;         /* further buffers of a multi-buffer frame still to drop */
static u32 ping_got[PING_COUNT]; /* echo replies per sequence number */
static u32 udp_got, stream_got;
static char udp_msg[32];
static u32 udp_len;
static u32 rx_frames, tx_frames, rx_other, rx_bad, rx_partial, rx_valid, served_arp, served_icmp, refills;
static u64 rx_bytes, tx_bytes; /* of the frames counted in rx_frames/tx_frames, without the header */
static u16 ip_id;
static const char *rx_error; /* a fatal problem seen while handling a frame */

/* ---- bytes and checksums (network order) ---- */
static u16 get16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 get32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u32 x)
{
	p[0] = (u8)(x >> 8);
	p[1] = (u8)x;
}
static void put32(u8 *p, u32 x)
{
	put16(p, x >> 16);
	put16(p + 2, x);
}

static u32 csum_add(u32 sum, const u8 *p, u32 len)
{
	for (; len > 1; p += 2, len -= 2)
		sum += get16(p);
	if (len)
		sum += (u32)p[0] << 8;
	return sum;
}
static u16 csum_fold(u32 sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (u16)sum;
}
/* The TCP/UDP pseudo-header sum, not folded. */
static u32 pseudo_sum(u32 src, u32 dst, u8 proto, u32 len)
{
	return (src >> 16) + (src & 0xffff) + (dst >> 16) + (dst & 0xffff) + proto + len;
}

static void fmt_ip(char *b, u32 ip) { fmt(b, 16, "%u.%u.%u.%u", ip >> 24, ip >> 16 & 255, ip >> 8 & 255, ip & 255); }
static void fmt_mac(char *b, const u8 *m)
{
	fmt(b, 18, "%02x:%02x:%02x:%02x:%02x:%02x", m[0], m[1], m[2], m[3], m[4], m[5]);
}

static int parse_ip(const char *s, u32 *out)
{
	u32 ip = 0;
	for (int i = 0; i < 4; i++) {
		u64 x;
		if (!parse_u64(&s, &x) || x > 255)
			return 0;
		ip = ip << 8 | (u32)x;
		if (i < 3 && *s++ != '.')
			return 0;
	}
	if (*s)
		return 0;
	*out = ip;
	return 1;
}

/* ---- TX: one frame at a time from tx_buf (header + frame in one descriptor) ---- */
static u8 *tx_frame(void)
{
	memset(tx_buf, 0, HDR_LEN);
	return tx_buf + HDR_LEN;
}

static int tx_done(void *arg)
{
	(void)arg;
	return txp->tx->used->idx == txp->tx->avail_idx;
}

/* Publishes the n chains added to the tx queue with one notification and waits until the device has
 * used them all, each with used len 0 (it writes nothing). The wait does not insist on the tx
 * interrupt (unlike vq_wait): on kvm_pvm an MSI that arrives while another vector's handler runs
 * stays in the LAPIC IRR until the next interrupt (see the stats check). */
static const char *tx_flush(u32 n)
{
	struct virtq *q = txp->tx;
	vq_kick(q);
	if (!wait_cond(tx_done, 0, v.mode, VQ_TIMEOUT_MS)) {
		u8 s = virtio_status(&v);
		return failf("tx queue %u: used idx %u, want %u after %u ms (mode %s, status %#x)", q->index,
			     q->used->idx, q->avail_idx, VQ_TIMEOUT_MS, wait_mode_name(v.mode), s);
	}
	for (u32 i = 0; i < n; i++) {
		struct vq_done d;
		if (vq_pop(q, &d) != 1)
			return failf("tx used ring returned an id that is not a chain in flight");
		if (d.len)
			return failf("tx chain %u came back with used len %u, want 0", d.head, d.len);
	}
	return 0;
}

/* Adds a chain of n buffers to the tx queue (published by tx_flush). */
static const char *tx_add(const struct vq_buf *b, int n)
{
	struct virtq *q = txp->tx;
	if (vq_add(q, b, n) < 0)
		return failf("tx queue %u full (%u of %u descriptors in flight, %d more)", q->index, q->in_flight, q->size, n);
	return 0;
}

/* Sends the frame in tx_buf and waits until the device has used it. */
static const char *tx_send(u32 len)
{
	if (len < 60) { /* pad to the Ethernet minimum */
		memset(tx_buf + HDR_LEN + len, 0, 60 - len);
		len = 60;
	}
	struct vq_buf b = {tx_buf, HDR_LEN + len, 0};
	const char *why = tx_add(&b, 1);
	if (!why)
		why = tx_flush(1);
	if (!why) {
		tx_frames++;
		txp->tx_frames++;
		tx_bytes += len;
	}
	return why;
}

static u8 *eth_fill(u8 *f, const u8 *dst, u16 type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, mac, 6);
	put16(f + 12, type);
	return f + ETH_LEN;
}

/* IPv4 header (20 bytes, DF, TTL 64) with its checksum. */
static u8 *ip_fill(u8 *p, u32 dst, u8 proto, u32 payload)
{
	memset(p, 0, IP_LEN);
	p[0] = 0x45;
	put16(p + 2, IP_LEN + payload);
	put16(p + 4, ++ip_id);
	put16(p + 6, 0x4000);
	p[8] = 64;
	p[9] = proto;
	put32(p + 12, my_ip);
	put32(p + 16, dst);
	put16(p + 10, (u16)~csum_fold(csum_add(0, p, IP_LEN)));
	return p + IP_LEN;
}

static const char *send_arp(u16 op, const u8 *dst_mac, const u8 *tha, u32 tpa)
{
	u8 *f = tx_frame();
	u8 *a = eth_fill(f, dst_mac, ETH_ARP);
	put16(a, 1);
	put16(a + 2, ETH_IP);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, op);
	memcpy(a + 8, mac, 6);
	put32(a + 14, my_ip);
	memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	return tx_send(ETH_LEN + 28);
}

/* An ICMP message (8-byte header + dlen bytes of data) to dst at dst_mac, checksummed here. */
static const char *send_icmp(const u8 *dst_mac, u32 dst, u8 type, u16 id, u16 seq, const u8 *data, u32 dlen)
{
	u8 *f = tx_frame();
	u8 *ic = ip_fill(eth_fill(f, dst_mac, ETH_IP), dst, IP_ICMP, 8 + dlen);
	ic[0] = type;
	ic[1] = 0;
	put16(ic + 2, 0);
	put16(ic + 4, id);
	put16(ic + 6, seq);
	memcpy(ic + 8, data, dlen);
	put16(ic + 2, (u16)~csum_fold(csum_add(0, ic, 8 + dlen)));
	return tx_send(ETH_LEN + IP_LEN + 8 + dlen);
}

static void ping_payload(u8 *p, u16 seq)
{
	for (u32 i = 0; i < PING_DATA; i++)
		p[i] = (u8)('a' + (i + seq) % 26);
}

/* Header and frame at buf: a UDP datagram carrying msg from port sport (UDP_SRC_PORT + the pair
 * it goes on, for the stream) to the peer's udp_port. Returns the frame's length. */
static u32 udp_fill(u8 *buf, const char *msg, u32 len, int offload, u32 sport)
{
	memset(buf, 0, HDR_LEN);
	u8 *u = ip_fill(eth_fill(buf + HDR_LEN, peer_mac, ETH_IP), peer_ip, IP_UDP, 8 + len);
	put16(u, sport);
	put16(u + 2, udp_port);
	put16(u + 4, 8 + len);
	put16(u + 6, 0);
	memcpy(u + 8, msg, len);
	u32 ps = pseudo_sum(my_ip, peer_ip, IP_UDP, 8 + len);
	if (offload) {
		/* The device completes it: sum from csum_start to the end, stored at +csum_offset,
		 * which holds the pseudo-header sum (folded, not inverted). */
		struct net_hdr *h = (struct net_hdr *)buf;
		h->flags = HDR_F_NEEDS_CSUM;
		h->csum_start = ETH_LEN + IP_LEN;
		h->csum_offset = 6;
		put16(u + 6, csum_fold(ps));
	} else {
		u16 c = (u16)~csum_fold(csum_add(ps, u, 8 + len));
		put16(u + 6, c ? c : 0xffff);
	}
	return ETH_LEN + IP_LEN + 8 + len;
}

static const char *send_udp(const char *msg, u32 len, int offload)
{
	return tx_send(udp_fill(tx_buf, msg, len, offload, UDP_SRC_PORT));
}

/* ---- TX: malformed chains (ringvm.net.bad=1) ----
 * Each is a UDP datagram to the peer's echo port with a payload naming the case, so one that reached
 * the wire would show at the peer, spoilt in a way the device must refuse: it returns the chain
 * (used len 0) and counts it in tx_dropped. */
#define MAX_FRAME 65550       /* the device's largest frame (net/src/hdr.rs): 64 KiB GSO + Ethernet + VLAN */
#define FAR_ADDR (1ull << 40) /* far above the RAM of any guest the tests boot */
enum {
	BAD_OVERSIZED,   /* one byte over MAX_FRAME: the datagram, then image bytes */
	BAD_SHORT,       /* shorter than the header */
	BAD_RUNT,        /* a header and less than an Ethernet header */
	BAD_WRITABLE,    /* a device-writable buffer */
	BAD_OUT_OF_RAM,  /* the frame's second buffer at an address with no RAM: an invalid chain */
	BAD_GSO_TYPE,    /* gso_type 2, which the spec does not define */
	BAD_GSO_FEATURE, /* UDP fragmentation (UFO), a GSO type never negotiated here */
	BAD_CSUM_RANGE,  /* NEEDS_CSUM with the checksum ending one byte past the frame */
	BAD_CASES
};
static const char *const bad_name[BAD_CASES] = {"oversized", "short", "runt", "writable",
						"out-of-ram", "gso-type", "gso-feature", "csum-range"};
/* One per case, and one for the valid datagram of the batch. */
static u8 bad_buf[BAD_CASES + 1][128] __attribute__((aligned(64)));

/* A UDP datagram at buf padded with image bytes to a frame of len bytes: 2 buffers in b[]. */
static void padded_udp(u8 *buf, const char *msg, u32 len, struct vq_buf *b)
{
	u32 head = udp_fill(buf, msg, (u32)strlen(msg), 0, UDP_SRC_PORT);
	b[0] = (struct vq_buf){buf, HDR_LEN + head, 0};
	b[1] = (struct vq_buf){__image_start, len - head, 0};
}

/* Builds malformed chain k in buf; fills b[] and returns its number of buffers. */
static int bad_chain(int k, u8 *buf, struct vq_buf *b)
{
	char msg[32];
	fmt(msg, sizeof(msg), "ringvm-bad-%s", bad_name[k]);
	if (k == BAD_OVERSIZED) {
		padded_udp(buf, msg, MAX_FRAME + 1, b);
		return 2;
	}
	int offload = k == BAD_GSO_FEATURE || k == BAD_CSUM_RANGE;
	u32 len = udp_fill(buf, msg, (u32)strlen(msg), offload, UDP_SRC_PORT);
	struct net_hdr *h = (struct net_hdr *)buf;
	b[0] = (struct vq_buf){buf, HDR_LEN + len, 0};
	switch (k) {
	case BAD_SHORT:
		b[0].len = HDR_LEN - 4;
		break;
	case BAD_RUNT:
		b[0].len = HDR_LEN + ETH_LEN - 1;
		break;
	case BAD_WRITABLE:
		b[0].write = 1;
		break;
	case BAD_OUT_OF_RAM:
		b[0].len = HDR_LEN + ETH_LEN;
		b[1] = (struct vq_buf){phys(FAR_ADDR), len - ETH_LEN, 0};
		return 2;
	case BAD_GSO_TYPE:
		h->gso_type = 2;
		break;
	case BAD_GSO_FEATURE:
		h->gso_type = 3;
		h->gso_size = 512;
		break;
	case BAD_CSUM_RANGE:
		h->csum_offset = (u16)(len + 1 - 2 - h->csum_start);
		break;
	}
	return 1;
}

static u32 chain_bytes(const struct vq_buf *b, int n)
{
	u32 total = 0;
	for (int i = 0; i < n; i++)
		total += b[i].len;
	return total;
}

/* After the normal exchange: each malformed chain alone, then a frame of exactly MAX_FRAME bytes
 * (which the device takes), then every malformed chain again in one notification with a valid
 * datagram among them. The UDP echo that follows shows the device still works. */
static const char *send_bad(void)
{
	struct vq_buf b[2];
	const char *why;
	for (int k = 0; k < BAD_CASES; k++) {
		int n = bad_chain(k, bad_buf[k], b);
		if ((why = tx_add(b, n)) || (why = tx_flush(1)))
			return why;
		say("virtio-net bad %s: %u bytes in %d buffer%s returned", bad_name[k], chain_bytes(b, n), n,
		    n > 1 ? "s" : "");
	}
	padded_udp(tx_buf, "ringvm-max-frame", MAX_FRAME, b);
	if ((why = tx_add(b, 2)) || (why = tx_flush(1)))
		return why;
	tx_frames++;
	tx_bytes += chain_bytes(b, 2) - HDR_LEN;
	say("virtio-net max-frame: %u bytes in 2 buffers returned", chain_bytes(b, 2));
	for (int k = 0; k < BAD_CASES; k++) {
		if (k == BAD_CASES / 2) {
			const char *msg = "ringvm-batch-valid"; /* 60 bytes on the wire, no padding needed */
			u8 *buf = bad_buf[BAD_CASES];
			b[0] = (struct vq_buf){buf, HDR_LEN + udp_fill(buf, msg, (u32)strlen(msg), 0, UDP_SRC_PORT), 0};
			tx_bytes += b[0].len - HDR_LEN;
			if ((why = tx_add(b, 1)))
				return why;
		}
		int n = bad_chain(k, bad_buf[k], b);
		if ((why = tx_add(b, n)))
			return why;
	}
	if ((why = tx_flush(BAD_CASES + 1)))
		return why;
	tx_frames++;
	say("virtio-net batch: %u malformed chains and 1 datagram in one notification returned", BAD_CASES);
	return 0;
}

/* ---- RX ---- */
static void rx_arp(const u8 *f, u32 len)
{
	const u8 *a = f + ETH_LEN;
	if (len < ETH_LEN + 28 || get16(a) != 1 || get16(a + 2) != ETH_IP || a[4] != 6 || a[5] != 4) {
		rx_other++;
		return;
	}
	u16 op = get16(a + 6);
	u32 spa = get32(a + 14), tpa = get32(a + 24);
	if (op == 2 && spa == peer_ip && tpa == my_ip && !have_peer) {
		memcpy(peer_mac, a + 8, 6);
		have_peer = 1;
	} else if (op == 1 && tpa == my_ip) {
		u8 sha[6];
		memcpy(sha, a + 8, 6);
		const char *why = send_arp(2, sha, sha, spa);
		if (why && !rx_error)
			rx_error = why;
		served_arp++;
	} else {
		rx_other++;
	}
}

static void rx_ip(const u8 *f, u32 len, struct net_hdr *h)
{
	u8 *ip = (u8 *)f + ETH_LEN;
	if (len < ETH_LEN + IP_LEN || ip[0] != 0x45) { /* no IP options from our peer */
		rx_other++;
		return;
	}
	u32 tot = get16(ip + 2);
	if (tot < IP_LEN || ETH_LEN + tot > len || csum_fold(csum_add(0, ip, IP_LEN)) != 0xffff) {
		rx_bad++;
		return;
	}
	u32 src = get32(ip + 12), dst = get32(ip + 16);
	if (dst != my_ip || (get16(ip + 6) & 0x3fff)) { /* not ours, or a fragment */
		rx_other++;
		return;
	}
	u8 *l4 = ip + IP_LEN;
	u32 l4len = tot - IP_LEN;
	if (h->flags & HDR_F_NEEDS_CSUM) {
		/* Partial checksum (GUEST_CSUM): complete it as the device would have, then check it
		 * like any other: this validates the pseudo-header sum the sender put in. */
		u32 start = h->csum_start, off = h->csum_offset;
		if (start < ETH_LEN + IP_LEN || start + off + 2 > ETH_LEN + tot) {
			rx_bad++;
			return;
		}
		u8 *s = (u8 *)f + start;
		put16(s + off, (u16)~csum_fold(csum_add(0, s, ETH_LEN + tot - start)));
		rx_partial++;
	} else if (h->flags & HDR_F_DATA_VALID) {
		rx_valid++;
	}
	u8 proto = ip[9];
	if (proto == IP_ICMP) {
		if (l4len < 8 || csum_fold(csum_add(0, l4, l4len)) != 0xffff) {
			rx_bad++;
			return;
		}
		u8 type = l4[0];
		u16 id = get16(l4 + 4), seq = get16(l4 + 6);
		if (type == 0 && src == peer_ip && id == PING_ID && seq < PING_COUNT && l4len == 8 + PING_DATA) {
			u8 want[PING_DATA];
			ping_payload(want, seq);
			if (memcmp(l4 + 8, want, PING_DATA) == 0)
				ping_got[seq]++;
			else
				rx_bad++;
		} else if (type == 8 && l4len <= 1400) {
			/* Echo request for us: reply to whoever sent it, at the MAC it came from. */
			u8 smac[6];
			memcpy(smac, f + 6, 6);
			const char *why = send_icmp(smac, src, 0, id, seq, l4 + 8, l4len - 8);
			if (why && !rx_error)
				rx_error = why;
			served_icmp++;
		} else if (type == 3 && src == peer_ip) {
			udp_unreach = l4[1] == 3 ? 1 : udp_unreach; /* port unreachable */
			rx_other++;
		} else {
			rx_other++;
		}
		return;
	}
	if (proto == IP_UDP) {
		if (l4len < 8 || get16(l4 + 4) != l4len) {
			rx_bad++;
			return;
		}
		if (get16(l4 + 6) &&
		    csum_fold(csum_add(pseudo_sum(src, dst, IP_UDP, l4len), l4, l4len)) != 0xffff) {
			rx_bad++;
			return;
		}
		if (src == peer_ip && get16(l4) == udp_port && get16(l4 + 2) == UDP_SRC_PORT &&
		    l4len - 8 == udp_len && memcmp(l4 + 8, udp_msg, udp_len) == 0)
			udp_got++;
		else if (src == peer_ip && get16(l4) == udp_port && get16(l4 + 2) >= UDP_SRC_PORT &&
			 get16(l4 + 2) < UDP_SRC_PORT + npairs && l4len - 8 > 14 &&
			 memcmp(l4 + 8, "ringvm-stream-", 14) == 0) {
			stream_got++;
			rxp->stream_echoed++;
		}
		else
			rx_other++;
		return;
	}
	rx_other++;
}

static void rx_frame(u8 *buf, u32 used)
{
	struct net_hdr *h = (struct net_hdr *)buf;
	rx_frames++;
	rxp->rx_frames++;
	rx_bytes += used - HDR_LEN; /* the caller checked used >= HDR_LEN */
	u32 len = used - HDR_LEN;
	if (used < HDR_LEN + ETH_LEN) {
		rx_bad++;
		return;
	}
	u8 *f = buf + HDR_LEN;
	if (memcmp(f, mac, 6) != 0 && memcmp(f, bcast, 6) != 0) {
		rx_other++; /* e.g. IPv6 multicast from the host */
		return;
	}
	u16 type = get16(f + 12);
	if (type == ETH_ARP)
		rx_arp(f, len);
	else if (type == ETH_IP)
		rx_ip(f, len, h);
	else
		rx_other++;
}

static int rx_pending(void *arg)
{
	(void)arg;
	for (u32 k = 0; k < npairs; k++)
		if (pairs[k].rx->used->idx != pairs[k].rx->used_seen)
			return 1;
	return 0;
}

/* Posts rx buffer k of pair p (device-writable, the whole buffer). */
static int rx_post(struct net_pair *p, u32 k)
{
	struct vq_buf b = {rx_buf[p - pairs][k], BUF_SIZE, 1};
	int head = vq_add(p->rx, &b, 1);
	if (head >= 0)
		p->buf_of_head[head] = (u8)k;
	return head;
}

/* Handles every frame the device has completed on p's rx queue and gives the buffers back. */
static const char *rx_drain_pair(struct net_pair *p)
{
	int posted = 0;
	struct vq_done d;
	int r;
	rxp = p;
	while ((r = vq_pop(p->rx, &d)) == 1) {
		u32 k = p->buf_of_head[d.head];
		u8 *buf = rx_buf[p - pairs][k];
		if (d.len > BUF_SIZE)
			return failf("rx buffer %u came back with used len %u > %u", k, d.len, BUF_SIZE);
		if (rx_skip) {
			rx_skip--;
		} else {
			u16 nb = ((struct net_hdr *)buf)->num_buffers;
			if (mrg && nb > 1) {
				/* A frame across several buffers: cannot happen for frames of at most
				 * 1514 bytes in 2 KiB buffers; drop it with its other buffers. */
				rx_skip = nb - 1u;
				rx_frames++;
				rx_bad++;
			} else if (d.len < HDR_LEN) {
				rx_frames++;
				rx_bad++;
			} else {
				rx_frame(buf, d.len);
			}
		}
		if (rx_post(p, k) < 0)
			return failf("rx queue %u full when giving back buffer %u", p->rx->index, k);
		posted++;
		if (rx_error)
			return rx_error;
	}
	if (r < 0)
		return failf("rx queue %u: used ring returned an id that is not a buffer in flight", p->rx->index);
	if (posted) {
		vq_kick(p->rx);
		refills++;
	}
	return 0;
}

/* The same for every pair. */
static const char *rx_drain(void)
{
	for (u32 k = 0; k < npairs; k++) {
		const char *why = rx_drain_pair(&pairs[k]);
		if (why)
			return why;
	}
	return 0;
}

/* Receives (and answers ARP/ICMP) until *flag reaches want or ms pass; returns 1 if reached. */
static int rx_until(const char **why, volatile u32 *flag, u32 want, u64 ms)
{
	u64 t0 = rdtsc(), per_ms = tsc_hz_or_guess() / 1000;
	for (;;) {
		*why = rx_drain();
		if (*why)
			return 0;
		if (flag && *flag >= want)
			return 1;
		u64 el = (rdtsc() - t0) / per_ms;
		if (el >= ms)
			return 0;
		wait_cond(rx_pending, 0, v.mode, ms - el);
	}
}

/* ---- Queue pairs (VIRTIO_NET_F_MQ, virtio 1.2 section 5.1.6.5.5) ---- */
static int ctrl_done(void *arg)
{
	(void)arg;
	return ctrl_q.used->idx == ctrl_q.avail_idx;
}

/* VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET n on the control queue: the class and command, the pair count
 * (le16) and the device-written ack in three descriptors, as Linux sends it; waits for the ack. */
static const char *set_pairs(u32 n)
{
	ctrl_buf[0] = CTRL_MQ;
	ctrl_buf[1] = CTRL_MQ_VQ_PAIRS_SET;
	ctrl_buf[2] = (u8)n;
	ctrl_buf[3] = (u8)(n >> 8);
	ctrl_buf[8] = 0xff;
	struct vq_buf b[3] = {{ctrl_buf, 2, 0}, {ctrl_buf + 2, 2, 0}, {ctrl_buf + 8, 1, 1}};
	if (vq_add(&ctrl_q, b, 3) < 0)
		return failf("control queue full");
	vq_kick(&ctrl_q);
	if (!wait_cond(ctrl_done, 0, v.mode, VQ_TIMEOUT_MS))
		return failf("control queue: VQ_PAIRS_SET %u not used after %u ms", n, VQ_TIMEOUT_MS);
	struct vq_done d;
	if (vq_pop(&ctrl_q, &d) != 1)
		return failf("control queue: used ring returned an id that is not a chain in flight");
	if (d.len != 1 || ctrl_buf[8] != CTRL_OK)
		return failf("control queue: VQ_PAIRS_SET %u acked %#x with used len %u, want VIRTIO_NET_OK, 1", n,
			     ctrl_buf[8], d.len);
	return 0;
}

/* Sets up the queues of pairs 1.. and the control queue (queue 2 x max_virtqueue_pairs), on pair 0's
 * MSI-X entries: 2 for every rx queue, 1 for every tx queue and the control queue. */
static const char *setup_pairs(u32 max)
{
	for (u32 k = 1; k < npairs; k++) {
		struct net_pair *p = &pairs[k];
		p->rx = &pair_q[2 * (k - 1)];
		p->tx = &pair_q[2 * (k - 1) + 1];
		const char *why = virtio_queue_at(&v, p->rx, (u16)(2 * k), v.q_entry[0], rx_ring[k]);
		if (!why)
			why = virtio_queue_at(&v, p->tx, (u16)(2 * k + 1), v.q_entry[1], tx_ring[k]);
		if (why)
			return why;
	}
	return virtio_queue_at(&v, &ctrl_q, (u16)(2 * max), v.q_entry[1], ctrl_ring);
}

static int rx_full(void *arg)
{
	struct net_pair *p = arg;
	return (u16)(p->rx->used->idx - p->rx->used_seen) >= p->rx->in_flight;
}

/* Every rx buffer of every pair is still posted at the device (none lost across a device restart):
 * a burst of as many datagrams as a pair has buffers, sent on the pair's flow (the tap steers the
 * echoes of a flow to the queue it came from), without taking anything off the rx rings, must fill
 * them all. */
static const char *rx_fill_check(void)
{
	for (u32 k = 0; k < npairs; k++) {
		struct net_pair *p = &pairs[k];
		const char *why = rx_drain();
		if (why)
			return why;
		u32 posted = p->rx->in_flight;
		txp = p;
		for (u32 i = 0; i < posted && !why; i++) {
			char msg[32];
			u32 len = (u32)fmt(msg, sizeof(msg), "ringvm-fill-%u-%u", k, i);
			why = tx_send(udp_fill(tx_buf, msg, len, 0, UDP_SRC_PORT + k));
		}
		txp = &pairs[0];
		if (why)
			return why;
		if (!wait_cond(rx_full, p, v.mode, VQ_TIMEOUT_MS))
			return failf("pair %u: %u of its %u rx buffers used after a burst of %u echoes", k,
				     (u16)(p->rx->used->idx - p->rx->used_seen), posted, posted);
		say("virtio-net pair %u rx buffers %u of %u filled by a burst of echoes", k, posted, posted);
	}
	return rx_drain();
}

/* Numbered datagrams to the peer for ms, datagram n on pair n % npairs from port UDP_SRC_PORT + that
 * pair, each sent once the previous one was used (a tx chain that never comes back fails the
 * wait); the peer's echoes are counted as they come, on the pair they come on. */
static const char *run_stream(u64 ms, const char *peer)
{
	const char *why;
	say("virtio-net stream to %s:%u for %lu ms", peer, udp_port, ms);
	u64 s0 = rdtsc(), per_ms = tsc_hz_or_guess() / 1000;
	u32 sent = 0;
	stream_got = 0;
	while ((rdtsc() - s0) / per_ms < ms) {
		char msg[32];
		u32 len = (u32)fmt(msg, sizeof(msg), "ringvm-stream-%u", sent);
		u32 k = sent % npairs;
		txp = &pairs[k];
		why = tx_send(udp_fill(tx_buf, msg, len, 0, UDP_SRC_PORT + k));
		txp = &pairs[0];
		if (why)
			return why;
		pairs[k].stream_sent++;
		sent++;
		rx_until(&why, 0, 0, 5);
		if (why)
			return why;
	}
	rx_until(&why, &stream_got, sent, 500);
	if (why)
		return why;
	say("virtio-net stream sent=%u echoed=%u", sent, stream_got);
	if (!sent || !stream_got)
		return failf("stream: %u datagrams sent, %u echoed", sent, stream_got);
	return rx_fill_check();
}

static const char *net_run(void)
{
	const char *s, *why;
	if (!(s = opt("net.ip")) || !parse_ip(s, &my_ip))
		return failf("ringvm.net.ip=%s: want the guest's IPv4 address", s ? s : "(missing)");
	if (!(s = opt("net.peer")) || !parse_ip(s, &peer_ip))
		return failf("ringvm.net.peer=%s: want the host side's IPv4 address", s ? s : "(missing)");
	u64 x = 0, serve_ms = 0, csum = 0, bad = 0, stream_ms = 0, want_pairs = 1;
	if (opt("net.udp") && (!opt_u64("net.udp", &x) || x < 1 || x > 65535))
		return failf("ringvm.net.udp=%s: want a port 1..65535", opt("net.udp"));
	udp_port = (u32)x;
	if (opt("net.serve_ms") && !opt_u64("net.serve_ms", &serve_ms))
		return failf("ringvm.net.serve_ms=%s: want milliseconds", opt("net.serve_ms"));
	if (opt("net.stream_ms") && (!opt_u64("net.stream_ms", &stream_ms) || stream_ms > 600000))
		return failf("ringvm.net.stream_ms=%s: want milliseconds", opt("net.stream_ms"));
	if (stream_ms && !udp_port)
		return failf("ringvm.net.stream_ms needs ringvm.net.udp (the stream goes to it)");
	if (opt("net.csum") && (!opt_u64("net.csum", &csum) || csum > 1))
		return failf("ringvm.net.csum=%s: want 0 or 1", opt("net.csum"));
	if (opt("net.bad") && (!opt_u64("net.bad", &bad) || bad > 1))
		return failf("ringvm.net.bad=%s: want 0 or 1", opt("net.bad"));
	if (bad && !udp_port)
		return failf("ringvm.net.bad=1 needs ringvm.net.udp (the malformed frames are datagrams to it)");
	if (opt("net.pairs") && (!opt_u64("net.pairs", &want_pairs) || want_pairs < 1 || want_pairs > NET_MAX_PAIRS))
		return failf("ringvm.net.pairs=%s: want 1..%u", opt("net.pairs"), NET_MAX_PAIRS);
	npairs = (u32)want_pairs;

	u64 want = NET_F_CSUM | NET_F_GUEST_CSUM | NET_F_MAC | NET_F_MRG_RXBUF | NET_F_STATUS;
	if (npairs > 1)
		want |= NET_F_MQ | NET_F_CTRL_VQ;
	why = virtio_open(&v, VIRTIO_TYPE_NET);
	if (!why)
		why = virtio_init(&v, want);
	if (why)
		return why;
	u32 max_pairs = 1;
	if (npairs > 1) {
		if ((v.drv_features & (NET_F_MQ | NET_F_CTRL_VQ)) != (NET_F_MQ | NET_F_CTRL_VQ))
			return failf("ringvm.net.pairs=%u, but the device does not offer VIRTIO_NET_F_MQ and CTRL_VQ", npairs);
		max_pairs = (u32)virtio_cfg(&v, 8, 2);
		if (max_pairs < npairs)
			return failf("ringvm.net.pairs=%u, but max_virtqueue_pairs is %u", npairs, max_pairs);
	}
	mrg = !!(v.drv_features & NET_F_MRG_RXBUF);
	if (v.drv_features & NET_F_MAC) {
		for (int i = 0; i < 6; i++)
			mac[i] = (u8)virtio_cfg(&v, (u32)i, 1);
	} else {
		static const u8 fallback[6] = {0x02, 0x52, 0x56, 0x4d, 0x00, 0x01}; /* locally administered */
		memcpy(mac, fallback, 6);
	}
	char mbuf[18], ibuf[16], pbuf[16];
	fmt_mac(mbuf, mac);
	fmt_ip(ibuf, my_ip);
	fmt_ip(pbuf, peer_ip);
	const char *link = "unknown (no STATUS)";
	if (v.drv_features & NET_F_STATUS)
		link = virtio_cfg(&v, 6, 2) & NET_S_LINK_UP ? "up" : "down";
	say("virtio-net mac %s%s link %s ip %s peer %s mrg-rxbuf=%d csum=%d guest-csum=%d", mbuf,
	    v.drv_features & NET_F_MAC ? "" : " (chosen: no MAC feature)", link, ibuf, pbuf, mrg,
	    !!(v.drv_features & NET_F_CSUM), !!(v.drv_features & NET_F_GUEST_CSUM));

	why = virtio_queue(&v, 0, rx_ring[0]);
	if (!why)
		why = virtio_queue(&v, 1, tx_ring[0]);
	if (!why && npairs > 1)
		why = setup_pairs(max_pairs);
	if (why)
		return why;
	for (u32 p = 0; p < npairs; p++) {
		u32 nrx = RX_BUFS < pairs[p].rx->size ? RX_BUFS : pairs[p].rx->size;
		for (u32 k = 0; k < nrx; k++)
			if (rx_post(&pairs[p], k) < 0)
				return failf("rx queue %u full at buffer %u", pairs[p].rx->index, k);
	}
	why = virtio_driver_ok(&v);
	if (why)
		return why;
	for (u32 p = 0; p < npairs; p++)
		vq_kick(pairs[p].rx); /* the buffers are there before DRIVER_OK; this tells the device */
	if (npairs > 1) {
		if ((why = set_pairs(npairs)))
			return why;
		say("virtio-net queue pairs %u of %u enabled (VQ_PAIRS_SET acked), control queue %u", npairs, max_pairs,
		    ctrl_q.index);
	}

	u32 irq_rx0 = irq_count[v.q.irq_slot], irq_tx0 = irq_count[v.q1.irq_slot],
	    irq_cfg0 = irq_count[v.vec_base & 15], tick0 = irq_count[IRQ_TIMER - IRQ_BASE];
	u64 t0 = rdtsc();

	/* ARP for the peer (a few attempts: the host side may still be coming up). */
	for (int a = 0; a < ATTEMPTS && !have_peer; a++) {
		why = send_arp(1, bcast, (const u8[6]){0}, peer_ip);
		if (why)
			return why;
		rx_until(&why, (volatile u32 *)&have_peer, 1, STEP_MS);
		if (why)
			return why;
	}
	if (!have_peer)
		return failf("no ARP reply from %s after %u requests (rx=%u frames, link %s)", pbuf, ATTEMPTS,
			     rx_frames, link);
	char pm[18];
	fmt_mac(pm, peer_mac);
	say("virtio-net arp peer %s is %s", pbuf, pm);

	/* ICMP echo, one at a time. */
	u32 pings = 0;
	for (u16 seq = 0; seq < PING_COUNT; seq++) {
		u8 data[PING_DATA];
		ping_payload(data, seq);
		why = send_icmp(peer_mac, peer_ip, 8, PING_ID, seq, data, PING_DATA);
		if (why)
			return why;
		if (rx_until(&why, &ping_got[seq], 1, STEP_MS))
			pings++;
		if (why)
			return why;
	}
	say("virtio-net ping %u/%u", pings, PING_COUNT);
	if (pings != PING_COUNT)
		return failf("ping %u/%u: no echo reply from %s for some requests", pings, PING_COUNT, pbuf);

	if (bad && (why = send_bad()))
		return why;

	/* UDP echo. */
	if (udp_port) {
		int offload = csum && (v.drv_features & NET_F_CSUM);
		if (csum && !offload)
			say("warning: virtio-net csum=1 but the device does not offer VIRTIO_NET_F_CSUM: checksumming in software");
		udp_len = (u32)fmt(udp_msg, sizeof(udp_msg), "ringvm-udp-%lu", (rdtsc() >> 8) % 1000000);
		for (int a = 0; a < ATTEMPTS && !udp_got && !udp_unreach; a++) {
			why = send_udp(udp_msg, udp_len, offload);
			if (why)
				return why;
			rx_until(&why, &udp_got, 1, STEP_MS);
			if (why)
				return why;
		}
		if (udp_unreach)
			return failf("udp %s:%u: port unreachable", pbuf, udp_port);
		if (!udp_got)
			return failf("udp %s:%u: no echo of \"%s\" after %u datagrams", pbuf, udp_port, udp_msg, ATTEMPTS);
		say("virtio-net udp echo \"%s\" from %s:%u ok (tx checksum %s, rx partial-checksums=%u data-valid=%u)",
		    udp_msg, pbuf, udp_port, offload ? "offloaded: NEEDS_CSUM" : "in software", rx_partial, rx_valid);
	}
	if (stream_ms && (why = run_stream(stream_ms, pbuf)))
		return why;
	u64 us = (rdtsc() - t0) / (tsc_hz_or_guess() / 1000000);

	if (serve_ms) {
		say("virtio-net serving arp/icmp on %s for %lu ms", ibuf, serve_ms);
		rx_until(&why, 0, 0, serve_ms);
		if (why)
			return why;
		say("virtio-net served arp-replies=%u echo-replies=%u", served_arp, served_icmp);
	}

	u32 irx = irq_count[v.q.irq_slot] - irq_rx0, itx = irq_count[v.q1.irq_slot] - irq_tx0,
	    icfg = irq_count[v.vec_base & 15] - irq_cfg0, ticks = irq_count[IRQ_TIMER - IRQ_BASE] - tick0;
	say("virtio-net stats rx=%u tx=%u interrupts=%u mode=%s time=%luus rx-irq=%u tx-irq=%u config-irq=%u "
	    "timer-irq=%u other=%u bad=%u refills=%u rx-bytes=%lu tx-bytes=%lu",
	    rx_frames, tx_frames, irx + itx, wait_mode_name(v.mode), us, irx, itx, icfg, ticks, rx_other, rx_bad,
	    refills, rx_bytes, tx_bytes);
	/* Every tx chain posted on every pair was used (tx_flush waits for each; this checks the rings
	 * agree), and every pair's rx queue still holds the buffers it was given. */
	for (u32 k = 0; k < npairs && npairs > 1; k++) {
		struct net_pair *p = &pairs[k];
		say("virtio-net pair %u rx=%u tx=%u stream-sent=%u stream-echoed=%u tx-used=%u/%u rx-posted=%u",
		    k, p->rx_frames, p->tx_frames, p->stream_sent, p->stream_echoed, p->tx->used->idx,
		    p->tx->avail_idx, p->rx->in_flight);
		if (p->tx->in_flight || p->tx->used->idx != p->tx->avail_idx)
			return failf("pair %u: tx used idx %u, avail idx %u: %u descriptors never used", k,
				     p->tx->used->idx, p->tx->avail_idx, p->tx->in_flight);
		if (stream_ms && !p->stream_echoed)
			return failf("pair %u: no stream echo came on its rx queue", k);
	}
	if (v.mode != WAIT_POLL) {
		/* Unlike rng/blk, no wait here insists on an interrupt: the device is usually done before
		 * the (interpreted) guest checks, so a vector may legitimately stay quiet. And on kvm_pvm
		 * an MSI that arrives while IF=0 (in another handler, or between waits) stays in the
		 * LAPIC IRR until a later interrupt is injected. So a silent vector is a warning. */
		for (u32 q = 0; q < 2; q++)
			if ((q ? itx : irx) == 0)
				say("warning: virtio-net no %s interrupt delivered on vector %#x (pending in the LAPIC IRR: %s)",
				    q ? "tx" : "rx", IRQ_BASE + (q ? v.q1 : v.q).irq_slot,
				    irq_is_pending(IRQ_BASE + (q ? v.q1 : v.q).irq_slot) ? "yes" : "no");
	}
	if (v.mode == WAIT_POLL && irx + itx)
		return failf("%u interrupts in poll mode", irx + itx);
	if (rx_bad)
		return failf("%u bad frames (checksum, length or multi-buffer)", rx_bad);
	return 0;
}

const char *scenario_virtio_net(void)
{
	memset(&v, 0, sizeof(v));
	v.name = "virtio-net";
	/* 0x48 config, 0x49 tx (queue 1, MSI-X entry 1), 0x4a rx (queue 0, entry 2). rx gets the
	 * higher vector: on kvm_pvm only the highest pending vector is injected when a new
	 * interrupt arrives (see the stats check), and rx is the one the waits sleep on. */
	v.vec_base = IRQ_BASE + 8;
	v.nr_queues = 2;
	v.q_entry[0] = 2;
	v.q_entry[1] = 1;
	memset(pairs, 0, sizeof(pairs));
	memset(&ctrl_q, 0, sizeof(ctrl_q));
	pairs[0].rx = &v.q;
	pairs[0].tx = &v.q1;
	npairs = 1;
	txp = rxp = &pairs[0];
	have_peer = udp_unreach = 0;
	rx_skip = udp_got = udp_len = 0;
	rx_frames = tx_frames = rx_other = rx_bad = rx_partial = rx_valid = served_arp = served_icmp = refills = 0;
	rx_bytes = tx_bytes = 0;
	memset(ping_got, 0, sizeof(ping_got));
	rx_error = 0;
	const char *why = virtio_mode("net.mode", &v.mode);
	if (why)
		return why;
	why = net_run();
	return virtio_finish(&v, why);
}
