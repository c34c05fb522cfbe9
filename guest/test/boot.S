/* ringvm test guest: PVH entry, long-mode switch, AP trampoline, exception stubs, CPL3 entry.
 *
 * Boot contract (PVH, as Linux and QEMU use it): the VMM loads the PT_LOAD segment at its
 * physical address (1 MiB) and enters pvh_entry, named by the XEN_ELFNOTE_PHYS32_ENTRY note, in
 * 32-bit protected mode with paging off, flat 4 GiB CS/DS, interrupts off and
 * EBX = physical address of struct hvm_start_info.
 */

#define SEL_CODE32 0x08
#define SEL_DATA 0x10
#define SEL_CODE64 0x18
#define SEL_UDATA 0x23
#define SEL_UCODE 0x2b

#define XEN_ELFNOTE_PHYS32_ENTRY 18
#define MSR_EFER 0xc0000080
#define EFER_LME 0x100
#define CR4_PAE 0x20
#define CR0_PE 0x1
#define CR0_PG 0x80000000

/* ---- the PVH note: name "Xen", 8-byte descriptor (as Linux emits it), 4-byte aligned ---- */
	.section .note.Xen, "a", @note
	.balign 4
	.long 4				/* namesz */
	.long 8				/* descsz */
	.long XEN_ELFNOTE_PHYS32_ENTRY	/* type */
	.asciz "Xen"
	.balign 4
	.quad pvh_entry
	.balign 4

/* CR4.PAE, CR3 = identity map, EFER.LME, CR0.PG, then a far jump into 64-bit code. */
.macro ENTER_LONG_MODE target
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pml4, %eax
	movl %eax, %cr3
	movl $MSR_EFER, %ecx
	rdmsr
	orl $EFER_LME, %eax
	wrmsr
	movl %cr0, %eax
	orl $(CR0_PG | CR0_PE), %eax
	movl %eax, %cr0
	ljmp $SEL_CODE64, $\target
.endm

	.section .text.boot, "ax"
	.code32
	.globl pvh_entry
pvh_entry:
	cli
	cld
	movl %ebx, %esi			/* hvm_start_info, kept in esi until kmain */
	lgdt gdt_desc
	ljmp $SEL_CODE32, $1f
1:	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	movl $boot_stack_top, %esp
	ENTER_LONG_MODE bsp_entry64

	.code64
bsp_entry64:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movq $boot_stack_top, %rsp
	movl %esi, %r12d		/* zero-extends */
	/* .bss is small: zero it even though the loader should have (p_memsz > p_filesz). */
	movq $__bss_start, %rdi
	movq $__bss_end, %rcx
	subq %rdi, %rcx
	shrq $3, %rcx
	xorl %eax, %eax
	rep stosq
	movl %r12d, %edi
	call kmain
2:	cli
	hlt
	jmp 2b

/* ---- application processors ----
 * INIT-SIPI-SIPI starts an AP in real mode at CS = vector << 8, IP = 0. smp.c copies
 * ap_tramp_start..ap_tramp_end to 0x8000 (vector 8). The trampoline loads the GDT (by its
 * physical address, this image is identity-placed), enters protected mode and jumps into the
 * image, which then follows the BSP's path to long mode. */
	.code16
	.balign 16
	.globl ap_tramp_start, ap_tramp_end
ap_tramp_start:
	cli
	cld
	movw %cs, %ax
	movw %ax, %ds
	lgdtl (ap_gdtr - ap_tramp_start)
	movl %cr0, %eax
	orl $CR0_PE, %eax
	movl %eax, %cr0
	ljmpl $SEL_CODE32, $ap_entry32
	.balign 8
ap_gdtr:
	.word gdt_end - gdt - 1
	.long gdt
ap_tramp_end:

	.code32
ap_entry32:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	ENTER_LONG_MODE ap_entry64

	.code64
ap_entry64:
	movl $SEL_DATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movq ap_stack_top(%rip), %rsp
	call ap_main
3:	cli
	hlt
	jmp 3b

/* ---- exceptions 0-31: push (error code or 0) and the vector, save GPRs, call trap() ---- */
	.text
.macro ISR n, err
	.balign 16
isr_\n:
	.if \err == 0
	pushq $0
	.endif
	pushq $\n
	jmp isr_common
.endm

ISR 0, 0
ISR 1, 0
ISR 2, 0
ISR 3, 0
ISR 4, 0
ISR 5, 0
ISR 6, 0
ISR 7, 0
ISR 8, 1
ISR 9, 0
ISR 10, 1
ISR 11, 1
ISR 12, 1
ISR 13, 1
ISR 14, 1
ISR 15, 0
ISR 16, 0
ISR 17, 1
ISR 18, 0
ISR 19, 0
ISR 20, 0
ISR 21, 1
ISR 22, 0
ISR 23, 0
ISR 24, 0
ISR 25, 0
ISR 26, 0
ISR 27, 0
ISR 28, 0
ISR 29, 1
ISR 30, 1
ISR 31, 0

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	cld
	call trap
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp
	iretq

/* ---- CPL3 ----
 * u64 enter_user(void (*fn)(void *) rdi, void *arg rsi, u64 user_rsp rdx)
 * Saves the callee-saved registers and RSP, then iretq to fn at CPL3 with IOPL=3 and IF=0.
 * Port I/O is allowed at CPL3 by IOPL=3 and by the all-zero TSS I/O bitmap (kvm_pvm ignores
 * IOPL and checks only the bitmap). fn returns into user_exit, whose hlt raises #GP; trap()
 * then calls user_return(vector), which resumes here as if enter_user returned that value.
 * Exceptions from CPL3 arrive on TSS.RSP0, so this stack stays intact. */
	.globl enter_user, user_return, user_exit
enter_user:
	pushq %rbx
	pushq %rbp
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, kernel_saved_rsp(%rip)
	subq $8, %rdx
	movq $user_exit, (%rdx)		/* return address of fn */
	pushq $SEL_UDATA		/* ss */
	pushq %rdx			/* rsp */
	pushq $0x3002			/* rflags: IOPL=3, IF=0 (kvm_pvm honours only the TSS I/O bitmap) */
	pushq $SEL_UCODE		/* cs */
	pushq %rdi			/* rip */
	movq %rsi, %rdi
	xorl %eax, %eax
	xorl %ebx, %ebx
	xorl %ecx, %ecx
	xorl %edx, %edx
	xorl %esi, %esi
	xorl %ebp, %ebp
	xorl %r8d, %r8d
	xorl %r9d, %r9d
	xorl %r10d, %r10d
	xorl %r11d, %r11d
	iretq

user_return:
	movq kernel_saved_rsp(%rip), %rsp
	movq %rdi, %rax
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %rbp
	popq %rbx
	ret

user_exit:				/* CPL3: hlt is privileged, so it raises #GP(0) */
	hlt
	ud2
	jmp user_exit

/* ---- data ---- */
	.data
	.balign 16
	.globl gdt, gdt_end, isr_table
gdt:
	.quad 0
	.quad 0x00cf9a000000ffff	/* 0x08 code32, DPL0 */
	.quad 0x00cf92000000ffff	/* 0x10 data, DPL0 */
	.quad 0x00af9a000000ffff	/* 0x18 code64, DPL0 */
	.quad 0x00cff2000000ffff	/* 0x20 data, DPL3 */
	.quad 0x00affa000000ffff	/* 0x28 code64, DPL3 */
	.quad 0, 0			/* 0x30 64-bit TSS, filled in by kmain */
gdt_end:
	.balign 16
gdt_desc:
	.word gdt_end - gdt - 1
	.quad gdt

isr_table:
	.irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
	.quad isr_\n
	.endr

/* Identity map of the first 4 GiB with 2 MiB pages, user-accessible (the CPL3 code shares
 * the image). 0xFEC00000-0xFFFFFFFF (IOAPIC, LAPIC, ...) is uncached. Built at link time, so
 * the (slow, interpreted) CPL0 code does not spend instructions on it. */
#define PTE_TABLE 0x7			/* present, writable, user */
#define PDE_2M 0x87			/* present, writable, user, 2 MiB */
#define PDE_2M_UC 0x9f			/* ... + PWT + PCD */
	.balign 4096
pml4:
	.quad pdpt + PTE_TABLE
	.fill 511, 8, 0
pdpt:
	.quad pd + PTE_TABLE
	.quad pd + 0x1000 + PTE_TABLE
	.quad pd + 0x2000 + PTE_TABLE
	.quad pd + 0x3000 + PTE_TABLE
	.fill 508, 8, 0
pd:
	.set i, 0
	.rept 2048
	.if i >= (0xfec00000 >> 21)
	.quad (i << 21) | PDE_2M_UC
	.else
	.quad (i << 21) | PDE_2M
	.endif
	.set i, i + 1
	.endr

	.bss
	.balign 8
	.globl ap_stack_top
ap_stack_top:
	.quad 0
kernel_saved_rsp:
	.quad 0

/* Stacks are not zeroed by the guest (NOBITS at the end of the image). */
	.section .stack, "aw", @nobits
	.balign 4096
	.skip 16384
	.globl boot_stack_top
boot_stack_top:
	.balign 4096
	.skip 8192
	.globl exc_stack_top		/* TSS.RSP0: exceptions from CPL3 */
exc_stack_top:
	.balign 4096
	.skip 16384
	.globl user_stack_top
user_stack_top:
	.balign 4096
	.globl ap_stacks		/* 64 x 2 KiB, one per AP (MAX_CPUS) */
ap_stacks:
	.skip 64 * 2048

	.section .note.GNU-stack, "", @progbits
