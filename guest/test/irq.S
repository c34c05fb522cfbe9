/* ringvm test guest: interrupt entry stubs for the device drivers (pci.c installs them).
 * Each stub pushes the caller-saved registers and calls irq_handler(vector) on the current
 * stack (interrupts are only enabled at CPL0, in wait_u16), then iretq. */

	.text
.macro IRQ vec
	.balign 16
irq_\vec:
	pushq %rdi
	movl $\vec, %edi
	jmp irq_common
.endm

	.irp v, 64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79
	IRQ \v
	.endr
	.irp v, 48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
	IRQ \v
	.endr
	IRQ 255

/* The CPU aligned RSP to 16 before pushing its 5-word frame; with 9 more words here the call
 * below sees the ABI's alignment. */
irq_common:
	pushq %rax
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	cld
	call irq_handler
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rax
	popq %rdi
	iretq

	.data
	.balign 8
	.globl irq_stubs
irq_stubs:
	.irp v, 64,65,66,67,68,69,70,71,72,73,74,75,76,77,78,79
	.quad irq_\v
	.endr
	.irp v, 48,49,50,51,52,53,54,55,56,57,58,59,60,61,62,63
	.quad irq_\v
	.endr
	.quad irq_255

	.section .note.GNU-stack, "", @progbits
