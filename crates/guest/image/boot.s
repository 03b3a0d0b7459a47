/* Ferry test guest — CPL 0 set-up (runs emulated on nested PVM KVM, so it is short).
 * Entered in 32-bit protected mode, paging off:
 *   BSP: multiboot (EAX = 0x2BADB002, EBX = multiboot info), by QEMU or Ferry.
 *   AP : Ferry only (EAX = 0x46455259 "FERY", ECX = vCPU index); waits for the BSP's tables.
 *   On the BSP Ferry also sets ESI = "FERY" and EDX = vCPUs started (kept in cpu_count).
 * Builds identity page tables (2 MiB pages, user-accessible; first 4 GiB here, the rest by
 * CPL 3 code on demand), a GDT with one TSS per CPU (I/O bitmap allowing ports 0..1023),
 * enters long mode and iretq's to guest_entry at CPL 3 with IOPL 3.
 * guest_entry(rdi = cpu index, rsi = multiboot info address, rdx = vCPUs started). */
.set MB_MAGIC, 0x1BADB002
.set MB_FLAGS, 0x00010003
.set AP_MAGIC, 0x46455259
.set MAX_CPUS, 32
.set TSS_SIZE, 256

.section .multiboot, "a"
.align 4
mb_header:
  .long MB_MAGIC
  .long MB_FLAGS
  .long -(MB_MAGIC + MB_FLAGS)
  .long mb_header
  .long __image_start
  .long __data_end
  .long __bss_end
  .long _start32

.section .text.boot, "ax"
.code32
.global _start32
_start32:
  cli
  cld
  cmpl $0x2BADB002, %eax
  jne 1f
  movl %ebx, mb_info_ptr
  cmpl $AP_MAGIC, %esi
  jne .Lno_count
  movl %edx, cpu_count
.Lno_count:
  xorl %esi, %esi
  movl $pdpt, %eax
  orl $7, %eax
  movl %eax, pml4
  movl $pd_tables, %eax
  orl $7, %eax
  movl $pdpt, %edi
  movl $512, %ecx
2:
  movl %eax, (%edi)
  addl $4096, %eax
  addl $8, %edi
  decl %ecx
  jnz 2b
  movl $0x87, %eax
  movl $pd_tables, %edi
  movl $2048, %ecx
3:
  movl %eax, (%edi)
  addl $0x200000, %eax
  addl $8, %edi
  decl %ecx
  jnz 3b
  movl $1, tables_ready
  jmp 5f
1:
  cmpl $AP_MAGIC, %eax
  jne 9f
  movl %ecx, %esi
4:
  pause
  cmpl $1, tables_ready
  jne 4b
5:
  cmpl $MAX_CPUS, %esi
  jae 9f
  lgdt gdt_ptr
  movl %esi, %eax
  shll $8, %eax
  addl $tss_array, %eax
  movl %eax, %ebx
  movw $104, 102(%ebx)
  movb $0xff, 232(%ebx)
  movl %esi, %eax
  incl %eax
  shll $12, %eax
  addl $kstacks, %eax
  movl %eax, 4(%ebx)
  movl %esi, %edi
  shll $4, %edi
  addl $gdt_tss, %edi
  movl %ebx, %eax
  shll $16, %eax
  orl $232, %eax
  movl %eax, (%edi)
  movl %ebx, %eax
  shrl $16, %eax
  andl $0xff, %eax
  orl $0x8900, %eax
  movl %ebx, %edx
  andl $0xff000000, %edx
  orl %edx, %eax
  movl %eax, 4(%edi)
  movl $0, 8(%edi)
  movl $0, 12(%edi)
  movl %cr4, %eax
  orl $0x620, %eax
  movl %eax, %cr4
  movl $pml4, %eax
  movl %eax, %cr3
  movl $0xC0000080, %ecx
  rdmsr
  orl $0x100, %eax
  wrmsr
  movl %cr0, %eax
  andl $0xFFFFFFF3, %eax
  orl $0x80000003, %eax
  movl %eax, %cr0
  ljmp $0x08, $start64
9:
  cli
  hlt
  jmp 9b

.code64
start64:
  movw $0x10, %ax
  movw %ax, %ds
  movw %ax, %es
  movw %ax, %ss
  xorl %eax, %eax
  movw %ax, %fs
  movw %ax, %gs
  movl %esi, %eax
  incl %eax
  shll $12, %eax
  addq $kstacks, %rax
  movq %rax, %rsp
  movl %esi, %eax
  shll $4, %eax
  addl $0x28, %eax
  ltr %ax
  movl %esi, %eax
  incl %eax
  shll $16, %eax
  addq $ustacks, %rax
  subq $8, %rax            /* as if called: the ABI wants rsp+8 16-byte aligned at entry */
  pushq $0x1b
  pushq %rax
  pushq $0x3002
  pushq $0x23
  pushq $guest_entry
  movl %esi, %edi
  movl mb_info_ptr, %esi
  movl cpu_count, %edx
  iretq

.section .data.boot, "aw"
.align 16
gdt:
  .quad 0
  .quad 0x00209A0000000000
  .quad 0x00CF92000000FFFF
  .quad 0x00CFF2000000FFFF
  .quad 0x0020FA0000000000
gdt_tss:
  .fill MAX_CPUS * 16, 1, 0
gdt_end:
.align 4
gdt_ptr:
  .word gdt_end - gdt - 1
  .long gdt
.align 8
mb_info_ptr:
  .quad 0
tables_ready:
  .long 0
cpu_count:
  .long 1

.section .bss.boot, "aw", @nobits
.align 4096
.global pd_tables
pml4:
  .skip 4096
pdpt:
  .skip 4096
pd_tables:
  .skip 512 * 4096
kstacks:
  .skip MAX_CPUS * 4096
ustacks:
  .skip MAX_CPUS * 65536
tss_array:
  .skip MAX_CPUS * TSS_SIZE
