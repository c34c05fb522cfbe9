/* ringvm test guest: the cpuid scenario. */
#include "test.h"

static int printable(const char *s, int n)
{
	for (int i = 0; i < n; i++)
		if (s[i] < 0x20 || s[i] > 0x7e)
			return 0;
	return 1;
}

#define BIT(r, n) (((r) >> (n)) & 1)

const char *scenario_cpuid(void)
{
	u32 r[4];
	char vendor[13];

	cpuid(0, 0, r);
	u32 max_leaf = r[0];
	memcpy(vendor, &r[1], 4);
	memcpy(vendor + 4, &r[3], 4);
	memcpy(vendor + 8, &r[2], 4);
	vendor[12] = 0;

	cpuid(0x80000000, 0, r);
	u32 max_ext = r[0];
	u32 ext1_edx = 0;
	if (max_ext >= 0x80000001) {
		cpuid(0x80000001, 0, r);
		ext1_edx = r[3];
	}
	say("cpuid vendor=%s max_leaf=%#x max_ext_leaf=%#x", printable(vendor, 12) ? vendor : "?", max_leaf,
	    max_ext);
	if (!printable(vendor, 12))
		return failf("vendor string is not printable");
	if (max_leaf < 1 || max_leaf > 0xff)
		return failf("max basic leaf %#x is not sane", max_leaf);
	if (max_ext < 0x80000001 || max_ext > 0x800000ff)
		return failf("max extended leaf %#x is not sane", max_ext);

	cpuid(1, 0, r);
	u32 eax = r[0], ebx = r[1], ecx = r[2], edx = r[3];
	u32 family = (eax >> 8) & 0xf, model = (eax >> 4) & 0xf, stepping = eax & 0xf;
	if (family == 0xf)
		family += (eax >> 20) & 0xff;
	if (family == 6 || family >= 0xf)
		model += ((eax >> 16) & 0xf) << 4;
	u32 apic_id = ebx >> 24;
	int hv = BIT(ecx, 31);
	say("cpuid family=%u model=%u stepping=%u apic_id=%u apic=%u x2apic=%u hypervisor=%u cx16=%u "
	    "tsc_deadline=%u lm=%u",
	    family, model, stepping, apic_id, BIT(edx, 9), BIT(ecx, 21), hv, BIT(ecx, 13), BIT(ecx, 24),
	    BIT(ext1_edx, 29));
	if (!BIT(ext1_edx, 29))
		return failf("leaf 0x80000001 says no long mode, yet the guest runs in it");
	if (!BIT(edx, 9))
		return failf("leaf 1 reports no local APIC");

	char sig[13] = {0};
	if (hv) {
		cpuid(0x40000000, 0, r);
		u32 hv_max = r[0];
		memcpy(sig, &r[1], 4);
		memcpy(sig + 4, &r[2], 4);
		memcpy(sig + 8, &r[3], 4);
		for (int i = 0; i < 12; i++) /* KVM pads with NULs; keep the printable prefix */
			if (sig[i] < 0x20 || sig[i] > 0x7e)
				sig[i] = 0;
		say("cpuid hypervisor=%s max_hv_leaf=%#x", sig, hv_max);
		if (hv_max != 0 && (hv_max < 0x40000000 || hv_max > 0x4000ffff))
			return failf("max hypervisor leaf %#x is not sane", hv_max);
	}
	const char *want = opt("expect.hv");
	if (want) {
		if (!hv)
			return failf("expected hypervisor %s, but the hypervisor bit is clear", want);
		if (!str_eq_n(sig, want, strlen(sig)))
			return failf("hypervisor signature %s, expected %s", sig, want);
	}
	return 0;
}
