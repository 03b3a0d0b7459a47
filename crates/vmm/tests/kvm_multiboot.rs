//! Multiboot kernels built the way QEMU's `-kernel` and GRUB take them: a 32-bit ELF, a flat
//! image with the header's address fields, and a kernel that calls a function before it
//! sets up a stack of its own. Each prints "OK" on COM1 from its 32-bit entry (CPL 0) and
//! powers off with a code.
use ferry_guest::console::LineSink;
use ferry_vmm::{BootSource, GuestExit, Vm, VmConfig};
use std::time::Duration;

const LOAD: u32 = 0x10_0000;

/// 32-bit code at `LOAD`: checks EAX is the multiboot magic, calls a routine that prints
/// "OK" (a `call` before any stack set-up: it needs the loader's ESP), then powers off with
/// code 7 (0x0e when EAX was wrong).
fn code() -> Vec<u8> {
    let mut c = vec![
        0x3d, 0x02, 0xb0, 0xad, 0x2b, // cmp eax, 0x2BADB002
        0x75, 0x0b, // jne bad
        0xe8, 0x0f, 0x00, 0x00, 0x00, // call print
        0xb0, 0x07, // mov al, 7
        0xe9, 0x02, 0x00, 0x00, 0x00, // jmp out
        // bad:
        0xb0, 0x0e, // mov al, 14
        // out:
        0x66, 0xba, 0xf4, 0x00, // mov dx, 0xf4
        0xee, // out dx, al
        0xf4, // hlt
        // print:
        0x66, 0xba, 0xf8, 0x03, // mov dx, 0x3f8
        0xb0, b'O', 0xee, // mov al,'O'; out
        0xb0, b'K', 0xee, // mov al,'K'; out
        0xb0, b'\n', 0xee, // mov al,'\n'; out
        0xc3, // ret
    ];
    // Fix the relative targets from the layout above.
    let jne_at = 5;
    let bad = 19;
    c[jne_at + 1] = (bad - (jne_at + 2)) as u8;
    let call_at = 7;
    let print = 27;
    c[call_at + 1..call_at + 5].copy_from_slice(&((print - (call_at + 5)) as u32).to_le_bytes());
    let jmp_at = 14;
    let out = 21;
    c[jmp_at + 1..jmp_at + 5].copy_from_slice(&((out - (jmp_at + 5)) as u32).to_le_bytes());
    c
}

fn header(flags: u32, fields: Option<[u32; 5]>) -> Vec<u8> {
    let magic = 0x1BAD_B002u32;
    let mut h = Vec::new();
    for w in [magic, flags, 0u32.wrapping_sub(magic).wrapping_sub(flags)] {
        h.extend_from_slice(&w.to_le_bytes());
    }
    for w in fields.into_iter().flatten() {
        h.extend_from_slice(&w.to_le_bytes());
    }
    h
}

/// A 32-bit ELF: one PT_LOAD at `LOAD` holding the header then the code; entry given as a
/// virtual address 0xC0000000 above the physical one when `higher_half`.
fn elf32(higher_half: bool) -> Vec<u8> {
    let mut body = header(0, None);
    let entry_off = body.len() as u32;
    body.extend(code());
    let vbase = if higher_half {
        0xC000_0000 + LOAD
    } else {
        LOAD
    };
    let mut f = vec![0u8; 0x54];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 1; // 32-bit
    f[5] = 1; // little-endian
    f[6] = 1;
    f[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[0x12..0x14].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    f[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
    f[0x18..0x1c].copy_from_slice(&(vbase + entry_off).to_le_bytes());
    f[0x1c..0x20].copy_from_slice(&0x34u32.to_le_bytes()); // e_phoff
    f[0x28..0x2a].copy_from_slice(&0x34u16.to_le_bytes()); // e_ehsize
    f[0x2a..0x2c].copy_from_slice(&32u16.to_le_bytes()); // e_phentsize
    f[0x2c..0x2e].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
    let ph = 0x34;
    let words = [
        1u32,
        0x54,
        vbase,
        LOAD,
        body.len() as u32,
        body.len() as u32 + 64,
        5,
        4,
    ];
    for (i, w) in words.iter().enumerate() {
        f[ph + i * 4..ph + i * 4 + 4].copy_from_slice(&w.to_le_bytes());
    }
    f.extend(body);
    f
}

/// A flat image: header with address fields at offset 0, code right after it.
fn flat() -> Vec<u8> {
    let hlen = 32u32;
    let code = code();
    let end = LOAD + hlen + code.len() as u32;
    let mut f = header(1 << 16, Some([LOAD, LOAD, end, end + 4096, LOAD + hlen]));
    f.extend(code);
    f
}

fn temp(name: &str, image: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("ferry-mb-{}-{name}", std::process::id()));
    std::fs::write(&path, image).unwrap();
    path
}

fn boot(image: &[u8]) -> (GuestExit, Vec<String>) {
    let path = temp("kernel", image);
    let (sink, rx) = LineSink::new();
    let cfg = VmConfig {
        cpus: 1,
        memory: 64 << 20,
        boot: BootSource::Kernel {
            path,
            initrd: None,
            cmdline: "console".into(),
        },
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let vm = Vm::new(cfg, Box::new(sink)).expect("create VM");
    vm.start().unwrap();
    // Safety net: a kernel that hangs is stopped.
    let abort = vm.abort_handle();
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(30));
        abort.abort(GuestExit::Stopped);
    });
    let exit = vm.wait();
    let lines = rx.try_iter().map(|l| l.1).collect();
    (exit, lines)
}

#[test]
fn a_32_bit_elf_multiboot_kernel_boots_and_calls_on_the_loaders_stack() {
    for higher_half in [false, true] {
        let (exit, lines) = boot(&elf32(higher_half));
        assert_eq!(exit, GuestExit::PowerOff { code: 7 }, "{lines:?}");
        assert_eq!(lines, vec!["OK".to_string()]);
    }
}

#[test]
fn a_flat_multiboot_image_with_address_fields_boots() {
    let (exit, lines) = boot(&flat());
    assert_eq!(exit, GuestExit::PowerOff { code: 7 }, "{lines:?}");
    assert_eq!(lines, vec!["OK".to_string()]);
}

#[test]
fn malformed_multiboot_images_are_refused_clearly() {
    let mut e = elf32(false);
    e[0x2c] = 200; // program headers past the end
    let path = temp("bad", &e);
    let cfg = VmConfig {
        cpus: 1,
        memory: 64 << 20,
        boot: BootSource::Kernel {
            path: path.clone(),
            initrd: None,
            cmdline: String::new(),
        },
        disks: Vec::new(),
        nets: Vec::new(),
    };
    let err = Vm::new(cfg.clone(), Box::new(std::io::sink()))
        .err()
        .unwrap();
    assert!(err.to_string().contains("program headers"), "{err}");
    let mut f = flat();
    f[16..20].copy_from_slice(&(LOAD + 64).to_le_bytes()); // load_addr above header_addr
    let ck = 0u32.wrapping_sub(0x1BAD_B002).wrapping_sub(1 << 16);
    f[8..12].copy_from_slice(&ck.to_le_bytes());
    std::fs::write(&path, &f).unwrap();
    let err = Vm::new(cfg, Box::new(std::io::sink())).err().unwrap();
    assert!(err.to_string().contains("load_addr"), "{err}");
}
