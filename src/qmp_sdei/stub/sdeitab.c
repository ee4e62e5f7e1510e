// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * sdeitab.efi: a UEFI application that installs an ACPI table with signature "SDEI".
 *
 * Linux on ACPI discovers SDEI only from such a table (it checks that the table exists; SDEI 1.x
 * defines no fields after the header), and QEMU 7.2 cannot add one. Run from the UEFI shell before
 * the kernel (startup.nsh), it asks the firmware's EFI_ACPI_TABLE_PROTOCOL to install a bare
 * 36-byte table; the firmware links it into the XSDT that the OS reads.
 *
 * Freestanding and position independent (every address is PC-relative, so the PE file needs no
 * relocations): only the few UEFI structure fields it touches are declared.
 */
typedef unsigned long long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef u64 efi_status;

struct efi_guid {
	u32 a;
	u16 b, c;
	u8 d[8];
};

struct efi_table_header {
	u64 signature;
	u32 revision, header_size, crc32, reserved;
};

struct efi_text_output {
	efi_status (*reset)(struct efi_text_output *self, int extended);
	efi_status (*output_string)(struct efi_text_output *self, const u16 *text);
};

struct efi_system_table {
	struct efi_table_header hdr;
	void *firmware_vendor;
	u32 firmware_revision;
	void *console_in_handle;
	void *con_in;
	void *console_out_handle;
	struct efi_text_output *con_out;
	void *standard_error_handle;
	void *std_err;
	void *runtime_services;
	void **boot_services; /* read as an array of pointers: only LocateProtocol is used */
};

/* EFI_BOOT_SERVICES: a 24-byte header, then LocateProtocol is the 38th function pointer. */
#define LOCATE_PROTOCOL_INDEX ((24 + 37 * 8) / 8)
typedef efi_status (*locate_protocol_fn)(const struct efi_guid *protocol, void *registration, void **interface);

struct efi_acpi_table_protocol {
	efi_status (*install_acpi_table)(struct efi_acpi_table_protocol *self, const void *table, u64 size, u64 *key);
};

static const struct efi_guid acpi_table_protocol_guid = {
	0xffe06bdd, 0x6107, 0x46a6, {0x7b, 0xb2, 0x5a, 0x9c, 0x7e, 0xc5, 0x27, 0x5c}
};

struct __attribute__((packed)) acpi_sdt_header {
	char signature[4];
	u32 length;
	u8 revision;
	u8 checksum;
	char oem_id[6];
	char oem_table_id[8];
	u32 oem_revision;
	char creator_id[4];
	u32 creator_revision;
};

static const u16 installed[] = u"qmp-sdei: installed the ACPI SDEI table\r\n";
static const u16 failed[] = u"qmp-sdei: error: could not install the ACPI SDEI table\r\n";

efi_status efi_main(void *image, struct efi_system_table *system)
{
	struct acpi_sdt_header table = {
		{'S', 'D', 'E', 'I'}, sizeof(struct acpi_sdt_header), 1, 0,
		{'Q', 'S', 'D', 'E', 'I', ' '}, {'Q', 'M', 'P', 'S', 'D', 'E', 'I', ' '}, 1,
		{'Q', 'S', 'D', 'E'}, 1,
	};
	const u8 *bytes = (const u8 *)&table;
	struct efi_acpi_table_protocol *acpi = 0;
	locate_protocol_fn locate;
	efi_status status;
	u64 key = 0;
	u8 sum = 0;

	(void)image;
	for (u32 i = 0; i < sizeof(table); i++)
		sum += bytes[i];
	table.checksum = (u8)(0 - sum); /* all bytes of an ACPI table add up to zero */
	locate = (locate_protocol_fn)system->boot_services[LOCATE_PROTOCOL_INDEX];
	status = locate(&acpi_table_protocol_guid, 0, (void **)&acpi);
	if (status == 0)
		status = acpi->install_acpi_table(acpi, &table, sizeof(table), &key);
	system->con_out->output_string(system->con_out, status == 0 ? installed : failed);
	return status;
}
