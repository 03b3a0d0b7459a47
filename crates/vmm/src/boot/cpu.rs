//! Initial vCPU register state for each boot protocol, and the GDT/page tables that the
//! Linux 64-bit entry needs.
use super::{multiboot, BootError, Entry};
use crate::memory::GuestMem;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

const GDT_ADDR: u64 = 0x500;
const IDT_ADDR: u64 = 0x520;
const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000; // four pages: identity map of the first 4 GiB
const BOOT_STACK: u64 = 0x8ff0;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT for the Linux entry: __BOOT_CS = 0x10, __BOOT_DS = 0x18, TSS = 0x20.
const GDT: [u64; 5] = [
    0,
    0,
    0x00af_9b00_0000_ffff, // 64-bit code
    0x00cf_9300_0000_ffff, // data
    0x008f_8b00_0000_ffff, // TSS (busy)
];

fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | (((entry >> 56) & 0xff) << 24);
    let limit = (entry & 0xffff) | (((entry >> 48) & 0xf) << 16);
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (limit << 12 | 0xfff) as u32
        } else {
            limit as u32
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Writes the GDT, an empty IDT and identity page tables for the first 4 GiB (2 MiB pages).
pub fn write_boot_tables(mem: &GuestMem) -> Result<(), BootError> {
    for (i, e) in GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    mem.write_obj(PDPT_ADDR | 3, GuestAddress(PML4_ADDR))?;
    for i in 0..4u64 {
        mem.write_obj((PD_ADDR + i * 4096) | 3, GuestAddress(PDPT_ADDR + i * 8))?;
    }
    let entries: Vec<u8> = (0..2048u64)
        .flat_map(|i| ((i << 21) | 0x83).to_le_bytes())
        .collect();
    mem.write_slice(&entries, GuestAddress(PD_ADDR))?;
    Ok(())
}

/// Register state for vCPU `index` of `count` at boot.
pub fn boot_registers(
    entry: Entry,
    index: u8,
    count: u8,
    mut sregs: kvm_sregs,
) -> (kvm_regs, kvm_sregs) {
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Multiboot32 { entry, info } => {
            let code = segment(0x00cf_9b00_0000_ffff, 2);
            let data = segment(0x00cf_9300_0000_ffff, 3);
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.cr0 = CR0_PE | CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry as u64;
            regs.rsp = multiboot::BOOT_STACK as u64;
            if index == 0 {
                regs.rax = multiboot::BOOT_MAGIC as u64;
                regs.rbx = info as u64;
                // Ferry's extension, in registers multiboot leaves undefined: ESI = "FERY"
                // says EDX holds the number of vCPUs started (the test guest waits for all of
                // them before it powers off; under QEMU it runs on the BSP alone).
                regs.rsi = multiboot::AP_MAGIC as u64;
                regs.rdx = count as u64;
            } else {
                regs.rax = multiboot::AP_MAGIC as u64;
                regs.rcx = index as u64;
            }
        }
        Entry::Linux64 { entry, boot_params } => {
            sregs.gdt.base = GDT_ADDR;
            sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
            sregs.idt.base = IDT_ADDR;
            sregs.idt.limit = 7;
            let code = segment(GDT[2], 2);
            let data = segment(GDT[3], 3);
            sregs.cs = code;
            sregs.ds = data;
            sregs.es = data;
            sregs.fs = data;
            sregs.gs = data;
            sregs.ss = data;
            sregs.tr = segment(GDT[4], 4);
            sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            regs.rip = entry;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = boot_params;
        }
    }
    (regs, sregs)
}

/// x87/SSE state at reset.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_decode() {
        let s = segment(GDT[2], 2);
        assert_eq!(
            (s.selector, s.type_, s.l, s.present, s.g),
            (0x10, 0xb, 1, 1, 1)
        );
        assert_eq!(s.limit, 0xffff_ffff);
        let d = segment(GDT[3], 3);
        assert_eq!((d.selector, d.type_, d.db, d.l), (0x18, 3, 1, 0));
    }
}
